import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.datamodules.transforms import frame_grid, load_frame, train_transform
from src.models.context import (
    CONFOUNDERS_FILE,
    ConfounderAccumulator,
    ConfounderError,
    Confounders,
    ContextMaskDataset,
    ContextModule,
    build_confounders,
    encode_mask,
    resize_nearest,
    sample_in_frame,
)


def _module(n=3, h=4, w=5, proj_dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n, h, w, generator=g)
    prior = torch.full((n,), 1.0 / n)
    return ContextModule(centers, prior, proj_dim)


# ---------------------------------------------------------------------------------- Eq. 3


def test_context_module_matches_eq3():
    torch.manual_seed(0)
    mod = _module(n=3, h=4, w=5)
    mask = torch.rand(2, 4, 5)
    m, alpha = mod(mask, return_alpha=True)
    assert m.shape == (2, 1, 4, 5) and alpha.shape == (2, 3)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2))
    c = mod.confounders.flatten(1)
    q = mask.flatten(1) @ mod.w1.weight.t() + mod.w1.bias
    k = c @ mod.w2.weight.t() + mod.w2.bias
    ref_alpha = torch.softmax(q @ k.t() / math.sqrt(3), dim=-1)
    torch.testing.assert_close(alpha, ref_alpha)
    ref_m = sum(ref_alpha[:, i, None] * mod.prior[i] * c[i] for i in range(3))
    torch.testing.assert_close(m.flatten(1), ref_m)
    torch.testing.assert_close(mod(mask.flatten(1)), m)  # (B, h*w) input too
    torch.testing.assert_close(mod.attention(mask), alpha)


def test_context_module_init_buffers_and_projection():
    torch.manual_seed(0)
    mod = ContextModule(torch.rand(20, 32, 32), torch.full((20,), 0.05))
    assert mod.proj_dim == 20 and mod.w1.out_features == 20 and mod.w1.in_features == 1024
    assert abs(mod.w1.weight.std().item() - 0.02) < 0.002
    assert (mod.w1.bias == 0).all() and (mod.w2.bias == 0).all()
    state = mod.state_dict()
    assert {"confounders", "prior"} <= set(state)  # persistent: the weights carry C and P
    assert _module(proj_dim=7).w2.out_features == 7


def test_context_module_gradients_reach_w1_w2_and_bad_shapes_raise():
    mod = _module()
    mod(torch.rand(2, 4, 5)).sum().backward()
    assert mod.w1.weight.grad is not None and mod.w2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 4, 5\)"):
        mod(torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="prior"):
        ContextModule(torch.rand(3, 4, 4), torch.rand(4))
    with pytest.raises(ValueError, match="NaN"):
        ContextModule(torch.full((3, 4, 4), float("nan")), torch.rand(3))


# ---------------------------------------------------------------------------------- frame


def test_frame_grid_coordinates():
    g = frame_grid(2, 4)
    assert g.shape == (2, 4, 3) and g.dtype == np.float32
    np.testing.assert_allclose(g[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(g[:, 0, 1], [-0.5, 0.5])
    assert (g[..., 2] == 1).all()
    assert load_frame("any", (3, 5)).shape == (3, 5, 3)


def _frame(h, w):
    return torch.from_numpy(frame_grid(h, w)).permute(2, 0, 1)[None]


def _smooth_map(h=8, w=8):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.5)[None, None]


def test_identity_frame_is_a_plain_resize():
    m = _smooth_map()
    out = sample_in_frame(m, _frame(40, 56), (10, 14))
    ref = F.interpolate(F.interpolate(m, (40, 56), mode="bilinear"), (10, 14), mode="bilinear")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flipped_frame_flips_the_context():
    m = _smooth_map()
    frame = _frame(32, 48)
    torch.testing.assert_close(
        sample_in_frame(m, frame.flip(-1), (8, 12)),
        sample_in_frame(m, frame, (8, 12)).flip(-1),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("seed", [0, 1, 3])  # 1: flip + padding, 3: padding, 0: crop
def test_frame_follows_rescale_flip_pad_and_crop(seed):
    """M moved through the augmented frame == M drawn at image size and augmented directly."""
    height, width, crop = 40, 56, 48
    m = _smooth_map()
    direct = F.interpolate(m, (height, width), mode="bilinear", align_corners=False)[0, 0]
    t = train_transform(
        crop, scale_range=(0.6, 1.6), extra_targets={"frame": "float", "direct": "float"}, seed=seed
    )
    image = np.zeros((height, width, 3), np.uint8)
    out = t(image=image, frame=frame_grid(height, width), direct=direct.numpy())
    frame, moved = out["frame"][None], out["direct"][None, None]
    assert frame.shape == (1, 3, crop, crop)
    full = sample_in_frame(m, frame, (crop, crop))
    torch.testing.assert_close(full, moved, atol=1e-4, rtol=0)  # exact at full resolution
    small = sample_in_frame(m, frame, (crop // 4, crop // 4))
    ref = F.interpolate(moved, (crop // 4, crop // 4), mode="bilinear", align_corners=False)
    # Two bilinear resamplings in a different order: equal up to interpolation error.
    torch.testing.assert_close(small, ref, atol=2e-2, rtol=0)
    padding = out["frame"][2] == 0
    assert (full[0, 0][padding] == 0).all()


# ---------------------------------------------------------------------------------- masks


def test_resize_nearest_uses_pixel_centres():
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(resize_nearest(label, (2, 2)), [[5, 7], [13, 15]])
    np.testing.assert_array_equal(resize_nearest(label, (8, 8))[::2, ::2], label)


def test_encode_mask_foreground_and_class_id():
    pred = np.array([[0, 1, 2, 255], [3, 3, 0, 0]], np.uint8)
    fg = encode_mask(pred, (2, 4), "foreground", num_classes=4)
    np.testing.assert_array_equal(fg, [[0, 1, 1, 0], [1, 1, 0, 0]])
    cid = encode_mask(pred, (2, 4), "class_id", num_classes=4)
    np.testing.assert_allclose(cid, [[0, 0.25, 0.5, 0], [0.75, 0.75, 0, 0]])
    assert fg.dtype == np.float32 and cid.dtype == np.float32
    with pytest.raises(ValueError, match="class id 9"):
        encode_mask(np.full((2, 2), 9, np.uint8), (2, 2), num_classes=4)
    with pytest.raises(ValueError, match="encoding"):
        encode_mask(pred, (2, 2), "onehot", num_classes=4)


def test_accumulator_centers_counts_priors_and_absent_class(caplog):
    acc = ConfounderAccumulator(num_classes=3, size=(2, 2))
    a = np.array([[1, 1], [0, 0]], np.uint8)  # class 1 on top
    b = np.array([[0, 1], [0, 2]], np.uint8)
    acc.update(a, np.array([1, 0, 0]))
    acc.update(b, np.array([1, 1, 0]))
    with caplog.at_level(logging.WARNING, logger="src.models.context"):
        centers, prior = acc.finalize("uniform", ["a", "b", "c"])
    assert "['c']" in caplog.text
    np.testing.assert_allclose(centers[0], [[0.5, 1.0], [0, 0]])
    np.testing.assert_allclose(centers[1], [[0, 0], [0, 1.0]])
    assert (centers[2] == 0).all() and np.isfinite(centers).all()
    np.testing.assert_allclose(prior, [1 / 3] * 3)
    assert acc.counts.tolist() == [2, 1, 0]
    _, emp = acc.finalize("empirical")
    np.testing.assert_allclose(emp, [2 / 3, 1 / 3, 0])
    _, empty = ConfounderAccumulator(3, (2, 2)).finalize("empirical")
    np.testing.assert_allclose(empty, [1 / 3] * 3)  # no image at all: no division by zero


def test_accumulator_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, (6, 6)).astype(np.uint8) for _ in range(4)]
    labels = [rng.integers(0, 2, 3) for _ in range(4)]
    whole, left, right = (ConfounderAccumulator(3, (3, 3)) for _ in range(3))
    for k, (p, lab) in enumerate(zip(preds, labels, strict=True)):
        whole.update(p, lab)
        (left if k < 2 else right).update(p, lab)
    left.merge(right)
    np.testing.assert_array_equal(left.sums, whole.sums)
    np.testing.assert_array_equal(left.counts, whole.counts)


# ---------------------------------------------------------------------------------- artifact


def _confounders(encoding="class_id"):
    preds = {
        "img_b": np.array([[0, 2], [2, 2]], np.uint8),
        "img_a": np.array([[1, 0], [0, 0]], np.uint8),
    }
    labels = {"img_b": np.array([0, 1]), "img_a": np.array([1, 0])}
    return build_confounders(
        preds,
        labels,
        num_classes=2,
        size=(2, 2),
        class_names=["cat", "dog"],
        dataset="synth",
        encoding=encoding,
    )


def test_confounders_round_trip(tmp_path):
    conf = _confounders()
    assert conf.ids == ["img_a", "img_b"]  # sorted
    conf.save(tmp_path)
    assert (tmp_path / "confounders.json").is_file()
    back = Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)
    np.testing.assert_array_equal(back.centers, conf.centers)
    np.testing.assert_array_equal(back.prior, [0.5, 0.5])
    np.testing.assert_array_equal(back.counts, [1, 1])
    assert back.class_names == ["cat", "dog"] and back.encoding == "class_id"
    np.testing.assert_allclose(back.mask_for("img_b"), [[0, 1], [1, 1]])
    np.testing.assert_allclose(back.mask_for("img_a"), [[0.5, 0], [0, 0]])
    assert back.masks.shape == (2, 2, 2) and back.masks.dtype == np.float32
    mod = back.context_module()
    assert mod.confounders.shape == (2, 2, 2) and mod.proj_dim == 2


def test_confounders_load_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(ConfounderError, match=f"{CONFOUNDERS_FILE} is missing.*Fix"):
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)
    _confounders().save(tmp_path)
    with pytest.raises(ConfounderError, match="data set 'synth'.*'voc'"):
        Confounders.load(tmp_path, expected_dataset="voc", expected_num_classes=2)
    with pytest.raises(ConfounderError, match="2 confounders.*20 foreground"):
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=20)
    with pytest.raises(ConfounderError, match=r"\(2, 2\).*\(32, 32\)"):
        Confounders.load(
            tmp_path, expected_dataset="synth", expected_num_classes=2, expected_size=(32, 32)
        )
    conf = _confounders()
    conf.centers[0, 0, 0] = np.nan
    conf.save(tmp_path)
    with pytest.raises(ConfounderError, match="NaN"):
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)
    (tmp_path / CONFOUNDERS_FILE).write_bytes(b"not a zip")
    with pytest.raises(ConfounderError, match="unreadable"):
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)


def test_mask_for_unknown_id_and_dataset_wrapper():
    conf = _confounders("foreground")
    with pytest.raises(ConfounderError, match="'nope'.*Fix"):
        conf.mask_for("nope")
    base = [{"id": "img_a", "image": torch.zeros(3, 4, 4)}, {"id": "img_b"}]
    ds = ContextMaskDataset(base, conf)
    assert len(ds) == 2
    sample = ds[1]
    assert sample["context_mask"].dtype == torch.float32
    torch.testing.assert_close(sample["context_mask"], torch.tensor([[0.0, 1], [1, 1]]))
