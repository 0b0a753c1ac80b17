"""Transforms: padding values, shapes, and extra targets following the image's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    train_transform,
    val_transform,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_padding_fills_mask_with_255_and_image_with_zero():
    t = train_transform(64, scale_range=(1.0, 1.0), hflip=False)
    out = t(image=_image(20, 30), mask=np.ones((20, 30), np.uint8))
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (64, 64) and out["mask"].dtype == torch.long
    pad = out["mask"] == 255
    assert pad.sum().item() == 64 * 64 - 20 * 30
    assert set(out["mask"].unique().tolist()) == {1, 255}
    assert (out["image"][:, pad] == 0).all()  # 0 after normalising = the mean colour


def test_output_shapes_with_random_scale_and_long_side_resize():
    image, mask = _image(50, 80), np.zeros((50, 80), np.uint8)
    for t in (
        train_transform(32, scale_range=(0.5, 1.5)),
        train_transform(32, resize_long=(40, 60)),
    ):
        for _ in range(5):
            out = t(image=image, mask=mask)
            assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)


def test_resize_long_sets_the_long_side():
    t = train_transform(128, resize_long=(60, 60), hflip=False)
    out = t(image=_image(30, 40), mask=np.zeros((30, 40), np.uint8))
    assert (out["mask"] != 255).sum().item() == 45 * 60  # long side 40 -> 60, short 30 -> 45


def test_context_and_float_map_follow_the_flip_and_crop():
    """An asymmetric scene: the left third is object 1, context 2 and M = 1; flips and crops
    must move all of them together with the image."""
    h, w = 40, 60
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 3] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 3] = 1
    context = np.where(mask == 1, 2, 0).astype(np.uint8)
    context_map = mask.astype(np.float32)
    t = train_transform(32, scale_range=(0.8, 1.2), extra_targets={"context_map": "float"}, seed=3)
    flipped = unflipped = 0
    for _ in range(30):
        out = t(image=image, mask=mask, context=context, context_map=context_map)
        assert out["context"].dtype == torch.long and out["context_map"].dtype == torch.float32
        valid = out["mask"] != 255
        obj = (out["mask"] == 1) & valid
        assert torch.equal(out["context"][valid] == 2, obj[valid])  # both nearest: exact
        # Bilinear (image, M) vs nearest (mask) may differ by one pixel on the object's edge.
        edge = torch.zeros_like(obj)
        edge[:, 1:] |= obj[:, 1:] != obj[:, :-1]
        edge[:, :-1] |= obj[:, 1:] != obj[:, :-1]
        inner = valid & ~edge
        bright = out["image"].mean(0) > 0.0  # white vs black in normalised units
        assert torch.equal(bright[inner], obj[inner])
        assert (out["context_map"][obj & inner] > 0.99).all()
        assert (out["context_map"][inner & ~obj] < 0.01).all()
        cols = obj.any(0).nonzero()
        if len(cols):
            left_side = cols.float().mean() < 16
            flipped += not left_side
            unflipped += left_side
    assert flipped and unflipped  # both branches of the flip were exercised


def test_undeclared_target_is_an_error():
    t = train_transform(32)
    with pytest.raises(KeyError, match="context_map.*extra_targets"):
        t(image=_image(20, 20), mask=np.zeros((20, 20), np.uint8), context_map=np.zeros((20, 20)))
    with pytest.raises(ValueError, match="kind 'bilinear'"):
        train_transform(32, extra_targets={"m": "bilinear"})


def test_eval_transform_keeps_size_and_normalises():
    mean_colour = (np.array(IMAGENET_MEAN) * 255).reshape(1, 1, 3)
    image = np.broadcast_to(mean_colour, (17, 23, 3)).round().astype(np.uint8)
    out = eval_transform()(image=image, mask=np.zeros((17, 23), np.uint8))
    assert out["image"].shape == (3, 17, 23) and out["mask"].shape == (17, 23)
    assert out["image"].abs().max().item() < 0.01
    white = eval_transform()(image=np.full((2, 2, 3), 255, np.uint8))["image"]
    expected = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(white[:, 0, 0].numpy(), expected, rtol=1e-5)


def test_val_transform_top_left_crop_and_pad():
    t = val_transform(32)
    big = _image(50, 40)
    out = t(image=big, mask=np.full((50, 40), 3, np.uint8))
    ref = eval_transform()(image=big[:32, :32])["image"]
    assert torch.allclose(out["image"], ref)
    small = t(image=_image(20, 25), mask=np.ones((20, 25), np.uint8))["mask"]
    assert (
        (small[:20, :25] == 1).all() and (small[20:] == 255).all() and (small[:, 25:] == 255).all()
    )


def test_reseed_controls_the_random_stream():
    image, mask = _image(60, 60), np.zeros((60, 60), np.uint8)
    a, b = train_transform(24, seed=1), train_transform(24, seed=1)
    assert torch.equal(a(image=image, mask=mask)["image"], b(image=image, mask=mask)["image"])
    b.reseed(2)
    outs_a = [a(image=image, mask=mask)["image"] for _ in range(3)]
    outs_b = [b(image=image, mask=mask)["image"] for _ in range(3)]
    assert any(not torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))


def test_extra_dtypes_are_made_resamplable():
    t = train_transform(16, extra_targets={"ir_label": "label", "m": "float"})
    out = t(
        image=_image(20, 20),
        mask=np.zeros((20, 20), np.uint8),
        ir_label=np.ones((20, 20), np.int64),  # OpenCV cannot resample int64
        m=np.ones((20, 20), np.float64),
    )
    assert out["ir_label"].dtype == torch.long and out["m"].dtype == torch.float32
    with pytest.raises(ValueError, match="'ir_label' must hold ids in 0..255"):
        t(image=_image(4, 4), mask=None, ir_label=np.full((4, 4), 300))


def test_scale_choices_draw_one_of_the_listed_factors():
    t = train_transform(400, scale_choices=[0.5, 1.5], hflip=False, seed=0)
    seen = set()
    for _ in range(20):
        out = t(image=_image(100, 80), mask=np.zeros((100, 80), np.uint8))
        # Pad value 255 marks what lies outside the rescaled image inside the 400 crop.
        inside = out["mask"] != 255
        seen.add((int(inside.any(1).sum()), int(inside.any(0).sum())))
    assert seen == {(50, 40), (150, 120)}
    with pytest.raises(ValueError, match="not both"):
        train_transform(64, resize_long=(32, 64), scale_choices=[1.0])


def test_colour_jitter_changes_the_image_only():
    from src.datamodules.transforms import train_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (32, 32), dtype=np.uint8)
    plain = train_transform(32, scale_range=None, hflip=False, seed=0)
    jitter = train_transform(
        32, scale_range=None, hflip=False, seed=0, color_jitter=[0.3] * 3 + [0.1]
    )
    a, b = plain(image=image, mask=mask), jitter(image=image, mask=mask)
    assert torch.equal(a["mask"], b["mask"]) and not torch.allclose(a["image"], b["image"])
