import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.datamodules.transforms import frame_grid, load_frame, train_transform
from src.models.context import (
    CONFOUNDERS_FILE,
    CONTEXT_VARIANTS,
    CalibratedContextModule,
    ConfounderAccumulator,
    ConfounderError,
    Confounders,
    ContextMaskDataset,
    ContextModule,
    build_confounders,
    build_context_module,
    context_generator,
    context_statistics,
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


def _blob_confounders(size=12):
    """6 class-average masks: blobs on a 3 x 2 grid (like the layout set's C)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.tensor([[y, x] for y in (3.0, 8.0) for x in (2.0, 5.5, 9.0)])
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / 4.0), centres


def _masks_near(centres, size=12, per_class=8, seed=1):
    """Per class, images whose mask is a 4x4 square near that class's blob."""
    g = torch.Generator().manual_seed(seed)
    masks, labels = [], []
    for k, (cy, cx) in enumerate(centres.tolist()):
        for _ in range(per_class):
            m = torch.zeros(size, size)
            y = int(min(max(cy + torch.randint(-1, 2, (), generator=g) - 2, 0), size - 4))
            x = int(min(max(cx + torch.randint(-1, 2, (), generator=g) - 2, 0), size - 4))
            m[y : y + 4, x : x + 4] = 1
            masks.append(m)
            labels.append(k)
    return torch.stack(masks), torch.tensor(labels)


def test_paper_module_is_inert_at_init_and_calibrated_is_live():
    """The issue's measurement, as a test: 6 blob confounders at 12x12. The paper's Eq. 3 at
    its N(0, 0.02) init gives uniform alpha and one tiny M for every image; the calibrated
    module picks each image's own class's c_i and M varies across images."""
    centers, centres = _blob_confounders()
    prior = torch.full((6,), 1 / 6)
    masks, labels = _masks_near(centres)
    gen = context_generator(0)
    paper = build_context_module("paper", centers, prior, generator=gen)
    live = build_context_module("calibrated", centers, prior, generator=gen)
    p, c = context_statistics(paper, masks), context_statistics(live, masks)
    assert p["alpha_entropy"] > 0.99 and p["m_spread"] < 0.01 and p["m_max"] < 0.2
    assert c["alpha_entropy"] < 0.7 and c["m_spread"] > 0.3 and c["alpha_max"] > 0.5
    picked = live.attention(masks).argmax(-1)
    assert (picked == labels).float().mean() > 0.8  # at init alpha ranks by overlap (0.875)


def test_calibrated_module_is_a_convex_mix_with_learnable_scale():
    centers, centres = _blob_confounders()
    prior = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])
    masks, _ = _masks_near(centres, per_class=2)
    live = CalibratedContextModule(centers, prior, temperature=5.0)
    m, alpha = live(masks, return_alpha=True)
    weights = alpha * prior
    weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(m.flatten(1), weights @ centers.flatten(1))
    assert m.min() >= 0 and m.max() <= 1  # renormalised by sum alpha P: no 1/n scale
    assert live.temperature.item() == pytest.approx(5.0)
    torch.testing.assert_close(live.w1.weight, torch.eye(144))  # identity init, d = h*w
    channel = live.channel(live(centers))
    torch.testing.assert_close(channel.mean(), torch.tensor(0.0), atol=0.2, rtol=0)
    channel.pow(2).sum().backward()
    for p in (live.gain, live.log_temperature, live.w1.weight, live.w2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    small = CalibratedContextModule(centers, prior, proj_dim=32, generator=context_generator(1))
    assert small.w1.weight.shape == (32, 144)
    torch.testing.assert_close(small.w1.weight, small.w2.weight)  # one shared projection
    with pytest.raises(ValueError, match="temperature"):
        CalibratedContextModule(centers, prior, temperature=0.0)
    with pytest.raises(ValueError, match=r"conta.context='dot'.*calibrated"):
        build_context_module("dot", centers, prior)


def test_context_modules_leave_the_global_rng_alone():
    """Common random numbers: building any context module (and seeding its own generator)
    does not move the global RNG, so the backbone built after it is round 0's."""
    centers, _ = _blob_confounders()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    for variant in CONTEXT_VARIANTS:
        build_context_module(variant, centers, torch.full((6,), 1 / 6), proj_dim=16)
    torch.testing.assert_close(torch.rand(4), expected)
    a = ContextModule(centers, torch.full((6,), 1 / 6), generator=context_generator(5))
    b = ContextModule(centers, torch.full((6,), 1 / 6), generator=context_generator(5))
    torch.testing.assert_close(a.w1.weight, b.w1.weight)


def test_shuffled_masks_give_every_image_another_images_m():
    conf = _confounders_of(10)
    shuffled = conf.with_shuffled_masks([conf.ids[:6], conf.ids[6:]], seed=0)
    assert shuffled.m_source == "shuffled"
    np.testing.assert_array_equal(shuffled.centers, conf.centers)
    for image_id in conf.ids:
        assert not np.array_equal(shuffled.mask_for(image_id), conf.mask_for(image_id))
    # A permutation within each group: the same multiset of masks.
    for group in (conf.ids[:6], conf.ids[6:]):
        before = sorted(conf.mask_for(i).tobytes() for i in group)
        assert sorted(shuffled.mask_for(i).tobytes() for i in group) == before


def _confounders_of(n: int) -> Confounders:
    preds, labels = {}, {}
    for k in range(n):
        pred = np.zeros((4, 4), np.uint8)
        pred.flat[k % 16] = 1 + k % 2
        preds[f"img_{k:02d}"] = pred
        labels[f"img_{k:02d}"] = np.eye(2, dtype=np.uint8)[k % 2]
    return build_confounders(
        preds, labels, num_classes=2, size=(4, 4), class_names=["a", "b"], dataset="synth"
    )


def test_a_confounder_file_of_the_other_variant_is_refused(tmp_path):
    conf = _confounders_of(4)
    conf.save(tmp_path)
    back = Confounders.load(
        tmp_path, expected_dataset="synth", expected_num_classes=2, expected_context="calibrated"
    )
    assert back.context == "calibrated" and back.c_source == "pred"
    with pytest.raises(
        ConfounderError, match=r"conta.context='calibrated'.*conta.context=calibrated"
    ):
        Confounders.load(
            tmp_path, expected_dataset="synth", expected_num_classes=2, expected_context="paper"
        )


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
    assert mod.confounders.shape == (2, 2, 2) and mod.proj_dim == 4  # calibrated: h*w


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


def test_a_confounder_file_naming_an_unknown_variant_is_refused(tmp_path):
    """The variant read from the file is checked against the known ones before anything is
    built from it."""
    _confounders_of(4).save(tmp_path)
    path = tmp_path / CONFOUNDERS_FILE
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["context"] = "builtins.open"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(ConfounderError, match="unknown context variant 'builtins.open'"):
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)


# ---------------------------------------------------------------- controls: mean C, prior alpha


def _class_confounders(n_images: int = 12) -> Confounders:
    """Three classes whose masks lie in different corners of a 6 x 6 map (C differs by class)."""
    preds, labels = {}, {}
    corners = [(slice(0, 3), slice(0, 3)), (slice(3, 6), slice(3, 6)), (slice(0, 3), slice(3, 6))]
    for k in range(n_images):
        cls = k % 3
        pred = np.zeros((6, 6), np.uint8)
        pred[corners[cls]] = cls + 1
        pred.flat[k % 36] = cls + 1  # images of one class differ a little
        preds[f"img_{k:02d}"] = pred
        labels[f"img_{k:02d}"] = np.eye(3, dtype=np.uint8)[cls]
    return build_confounders(
        preds, labels, num_classes=3, size=(6, 6), class_names=["a", "b", "c"], dataset="synth"
    )


@pytest.mark.parametrize("variant", CONTEXT_VARIANTS)
def test_mean_c_gives_every_class_and_every_image_the_same_m(variant):
    """conta.c_source=mean: every c_i is the mean of C, so alpha is uniform and M is that mean
    (calibrated) or that mean scaled by P (paper) for every image, whatever its m."""
    conf = _class_confounders()
    assert not np.allclose(conf.centers[0], conf.centers[1])  # the control removes a real signal
    mean = conf.with_mean_centers()
    assert mean.c_source == "mean" and mean.m_source == "own"
    for c in mean.centers:
        np.testing.assert_array_equal(c, conf.centers.mean(0))
    np.testing.assert_array_equal(mean.codes, conf.codes)  # m unchanged
    np.testing.assert_array_equal(mean.prior, conf.prior)
    module = build_context_module(
        variant, torch.from_numpy(mean.centers), torch.from_numpy(mean.prior)
    )
    masks = torch.from_numpy(mean.masks)
    m, alpha = module(masks, return_alpha=True)
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / 3))
    scale = 1.0 if variant == "calibrated" else 1 / 3  # paper: M = sum alpha_i P c_i
    for image_m in m:
        torch.testing.assert_close(
            image_m[0], torch.from_numpy(conf.centers.mean(0)) * scale, rtol=1e-5, atol=1e-6
        )
    assert context_statistics(module, masks)["m_spread"] < 1e-6
    if variant == "calibrated":  # the live module: with the class-wise C, M differs by image
        own_m = conf.context_module()(masks)
        assert (own_m - own_m[:1]).abs().amax() > 1e-3


def test_mean_c_ignores_classes_without_images():
    conf = _class_confounders()
    counts = conf.counts.copy()
    counts[2] = 0
    centers = conf.centers.copy()
    centers[2] = 0  # as build_confounders leaves a class no image contains
    conf = dataclasses.replace(conf, centers=centers, counts=counts)
    np.testing.assert_allclose(
        conf.with_mean_centers().centers[2], (centers[0] + centers[1]) / 2, rtol=1e-6
    )


@pytest.mark.parametrize("variant", CONTEXT_VARIANTS)
def test_permuting_c_across_classes_leaves_m_unchanged(variant):
    """Why the no-class-information control is the mean of C, not C shuffled across classes:
    M = sum_i alpha_i P(c_i) c_i does not depend on which class a c_i is filed under (uniform
    P), so a permuted C gives the same M for every image."""
    conf = _class_confounders()
    centers = torch.from_numpy(conf.centers)
    prior = torch.from_numpy(conf.prior)
    masks = torch.from_numpy(conf.masks)
    a = build_context_module(variant, centers, prior, generator=context_generator(1))
    b = build_context_module(variant, centers[[2, 0, 1]], prior, generator=context_generator(1))
    torch.testing.assert_close(a(masks), b(masks), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", CONTEXT_VARIANTS)
@pytest.mark.parametrize("prior", ["uniform", "empirical"])
def test_prior_attention_is_p_of_c_for_every_image(variant, prior):
    """conta.attention=prior: alpha = P(c) whatever the image's m, so M is the same map for every
    image (sum_i P_i^2 c_i / sum_i P_i^2 for calibrated, sum_i P_i^2 c_i for paper)."""
    conf = _class_confounders(n_images=10)  # 4 / 3 / 3 images: an empirical P that is not flat
    p = torch.full((3,), 1 / 3) if prior == "uniform" else torch.tensor([0.4, 0.3, 0.3])
    centers = torch.from_numpy(conf.centers)
    masks = torch.from_numpy(conf.masks)
    module = build_context_module(variant, centers, p, attention="prior")
    assert module.attention_mode == "prior"
    m, alpha = module(masks, return_alpha=True)
    torch.testing.assert_close(alpha, p.expand(len(masks), -1))
    weights = p * p
    if variant == "calibrated":
        weights = weights / weights.sum()
    expected = (weights[:, None, None] * centers).sum(0)
    for image_m in m:
        torch.testing.assert_close(image_m[0], expected, rtol=1e-5, atol=1e-6)
    stats = context_statistics(module, masks)
    assert stats["m_spread"] < 1e-6
    assert stats["alpha_max"] == pytest.approx(float(p.max()), rel=1e-6)
    # With the image's attention the same module makes different maps.
    image = build_context_module(variant, centers, p, attention="image")
    if variant == "calibrated":  # the paper module is inert at init: only the live one differs
        assert context_statistics(image, masks)["m_spread"] > 0.05


def test_an_unknown_attention_mode_is_refused():
    with pytest.raises(ValueError, match=r"conta.attention='uniform'.*conta.attention=image"):
        build_context_module(
            "calibrated", torch.rand(3, 4, 4), torch.full((3,), 1 / 3), attention="uniform"
        )
