"""SEC's localization cues: foreground threshold, gradient-saliency background, assembly, the cue
files (untrusted on read) and the statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.ndimage import median_filter

from src.datamodules.transforms import frame_grid
from src.models.cam import CAMNet, ContextInputError
from src.models.context import ContextModule
from src.postprocess.cues import (
    CueStats,
    assemble_cues,
    background_cues,
    cue_stats,
    foreground_cues,
    gradient_saliency,
    read_cues,
    resize_to_grid,
    write_cues,
)
from src.utils.errors import MissingArtifactError

TINY_BACKBONE = Path(__file__).resolve().parents[2] / "conf/backbone/resnet_tiny.yaml"
NUM_CLASSES = 5  # background + 4


# -- foreground ------------------------------------------------------------------------------
def test_foreground_threshold_is_strictly_above_a_fifth_of_the_max():
    cams = np.zeros((2, 3, 4), np.float32)
    cams[0] = [[1.0, 0.21, 0.2, 0.19], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.3]]
    cams[1] = [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.41, 0.4]]
    fg = foreground_cues(cams, [3, 1], (3, 4), NUM_CLASSES)
    assert fg.shape == (NUM_CLASSES, 3, 4) and fg.dtype == bool
    # class 3: > 0.2 * 1.0 (0.2 itself is not a cue); class 1: > 0.2 * 2.0 = 0.4
    assert fg[3].astype(int).tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert fg[1].astype(int).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert not fg[[0, 2, 4]].any()
    assert fg[1, 0, 0] and fg[3, 0, 0]  # one cell, two classes (SEC's multi-label format)


def test_foreground_threshold_parameter_and_all_zero_map():
    cams = np.array([[[1.0, 0.6, 0.4]], [[0.0, 0.0, 0.0]]], np.float32)
    fg = foreground_cues(cams, [2, 4], (1, 3), NUM_CLASSES, threshold=0.5)
    assert fg[2].tolist() == [[True, True, False]]
    assert not fg[4].any()  # a zero CAM gives an empty cue, no error (CueStats reports it)


def test_foreground_cues_are_resized_to_the_grid():
    # A stride-4 CAM of 8 x 8 with the object in the top-left quarter -> 2 x 2 grid.
    cams = np.zeros((1, 8, 8), np.float32)
    cams[0, :4, :4] = 1.0
    fg = foreground_cues(cams, [2], (2, 2), NUM_CLASSES)
    assert fg[2].tolist() == [[True, False], [False, False]]
    # Non-square source onto a square grid (the grid covers the whole image, stretched).
    cams = np.zeros((1, 6, 12), np.float32)
    cams[0, :, 9:] = 1.0  # the right quarter
    fg = foreground_cues(cams, [1], (3, 4), NUM_CLASSES)
    assert fg[1].astype(int).tolist() == [[0, 0, 0, 1]] * 3
    # Upsampling a coarse map keeps the peak's side.
    coarse = np.array([[[0.0, 1.0], [0.0, 0.0]]], np.float32)
    fg = foreground_cues(coarse, [1], (4, 4), NUM_CLASSES)
    assert fg[1, :2, 2:].all() and not fg[1, 2:, :2].any()


def test_a_single_pixel_peak_survives_the_shrink():
    # The max is taken on the grid: the peak's cell is a cue however much the resize smooths.
    cams = np.full((1, 40, 40), 0.01, np.float32)
    cams[0, 25, 33] = 1.0
    fg = foreground_cues(cams, [1], (4, 4), NUM_CLASSES)
    assert fg[1, 2, 3]
    resized = resize_to_grid(cams, (4, 4))
    assert resized.shape == (1, 4, 4) and resized.min() >= 0


def test_foreground_cues_check_keys():
    cams = np.ones((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="keys"):
        foreground_cues(cams, [1], (4, 4), NUM_CLASSES)
    with pytest.raises(ValueError, match="background"):
        foreground_cues(cams, [0, 1], (4, 4), NUM_CLASSES)
    with pytest.raises(ValueError, match="background"):
        foreground_cues(cams, [1, NUM_CLASSES], (4, 4), NUM_CLASSES)
    with pytest.raises(ValueError, match="repeat"):
        foreground_cues(cams, [2, 2], (4, 4), NUM_CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        foreground_cues(np.full((1, 4, 4), np.nan, np.float32), [1], (4, 4), NUM_CLASSES)
    assert not foreground_cues(np.zeros((0, 4, 4)), [], (2, 2), NUM_CLASSES).any()


# -- background ------------------------------------------------------------------------------
def test_background_takes_exactly_the_least_salient_fraction():
    rng = np.random.default_rng(0)
    sal = rng.random((41, 41))
    bg = background_cues(sal, 0.1)
    assert bg.shape == (41, 41) and bg.dtype == bool
    assert bg.sum() == 168  # round(0.1 * 1681)
    assert sal[bg].max() < sal[~bg].min()


def test_background_ties_are_broken_in_row_major_order():
    sal = np.ones((4, 5))
    sal[3, 4] = 0.0  # the unique minimum first, then the tied cells from the top-left
    bg = background_cues(sal, 0.2)  # 4 cells
    assert bg.sum() == 4
    assert bg[3, 4] and bg[0, :3].all()
    assert np.array_equal(background_cues(np.zeros((3, 3)), 0.5), background_cues(sal[:3, :3], 0.5))
    # the constant map: the first round(4.5) = 4 cells (Python rounds half to even)
    assert np.flatnonzero(background_cues(np.zeros((3, 3)), 0.5)).tolist() == [0, 1, 2, 3]


def test_background_has_at_least_one_cell():
    sal = np.arange(16, dtype=float).reshape(4, 4)[::-1]
    for fraction in (0.0, 0.001):
        bg = background_cues(sal, fraction)
        assert bg.sum() == 1 and bg[3, 0]  # the least salient cell
    assert background_cues(sal, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        background_cues(sal, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        background_cues(np.full((2, 2), np.nan))


# -- assembly --------------------------------------------------------------------------------
def test_assemble_resolves_overlap_in_favour_of_the_foreground_by_default():
    fg = np.zeros((NUM_CLASSES, 2, 3), bool)
    fg[2, 0, :2] = True
    fg[4, 0, 1:] = True  # (0, 1) is a cue of classes 2 and 4
    bg = np.array([[True, False, False], [True, True, False]])
    bg[0, 2] = True  # overlaps class 4's cue
    cues = assemble_cues(fg, bg)
    assert cues[0].astype(int).tolist() == [[0, 0, 0], [1, 1, 0]]  # (0,0), (0,2) went to fg
    assert np.array_equal(cues[1:], fg[1:])
    both = assemble_cues(fg, bg, overlap="both")
    assert np.array_equal(both[0], bg) and np.array_equal(both[1:], fg[1:])
    with pytest.raises(ValueError, match="overlap"):
        assemble_cues(fg, bg, overlap="background")


# -- gradient saliency -------------------------------------------------------------------------
def tiny_net(**kwargs) -> CAMNet:
    torch.manual_seed(0)
    backbone = instantiate(OmegaConf.load(TINY_BACKBONE))  # stride 8: strides (2, 2, 1, 1)
    return CAMNet(backbone, num_classes=NUM_CLASSES - 1, **kwargs).eval()


def reference_saliency(net: CAMNet, x: torch.Tensor, stage: int, classes=None) -> np.ndarray:
    """By hand: grad of the summed logits (of `classes`, default all) w.r.t. stage `stage`'s
    output, max |.|, median 3x3."""
    with torch.enable_grad():
        f = x[None]
        for s in net.backbone.stages[: stage + 1]:
            f = s(f)
        f = f.detach().requires_grad_(True)
        out = f
        for s in net.backbone.stages[stage + 1 :]:
            out = s(out)
        logits = net.classifier(out.mean(dim=(2, 3), keepdim=True)).flatten(1)
        if classes is not None:
            logits = logits[:, classes]
        (grad,) = torch.autograd.grad(logits.sum(), f)
    return median_filter(grad[0].abs().amax(dim=0).numpy(), size=3)


def test_gradient_saliency_is_simonyans_map_on_the_stage_output():
    net = tiny_net()
    x = torch.randn(3, 48, 64)
    for stage in (1, 2):
        sal = gradient_saliency(net, x, (6, 8), stage=stage)  # the stage-1/2 grid: no resize
        assert sal.shape == (6, 8) and sal.dtype == np.float32 and (sal >= 0).all()
        np.testing.assert_allclose(sal, reference_saliency(net, x, stage), rtol=1e-5, atol=1e-9)
    assert gradient_saliency(net, x, (41, 41)).shape == (41, 41)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="last stage"):
        gradient_saliency(net, x, (6, 8), stage=3)


def test_gradient_saliency_of_the_image_classes_only():
    net = tiny_net()
    x = torch.randn(3, 48, 64)
    mine = gradient_saliency(net, x, (6, 8), stage=2, classes=[1])
    np.testing.assert_allclose(mine, reference_saliency(net, x, 2, [1]), rtol=1e-5, atol=1e-9)
    assert not np.allclose(mine, gradient_saliency(net, x, (6, 8), stage=2))


def test_gradient_saliency_is_local():
    # Changing the left 64 px changes the map there and leaves the far right untouched: the map
    # follows the image content cell by cell (a spatially uniform gradient, e.g. at the last
    # stage, or an image-level score would fail one of the two).
    net = tiny_net()
    x = torch.randn(3, 32, 384)
    y = x.clone()
    y[:, :, :64] = torch.randn(3, 32, 64) * 3
    a = gradient_saliency(net, x, (4, 48))
    b = gradient_saliency(net, y, (4, 48))
    np.testing.assert_allclose(a[:, 24:], b[:, 24:], rtol=1e-5, atol=1e-9)
    assert np.abs(a[:, :8] - b[:, :8]).max() > 0.1 * a.max()
    assert len(np.unique(a.round(6))) > 10


def test_gradient_saliency_restores_the_net_and_ignores_the_callers_grad_mode():
    torch.manual_seed(0)
    backbone = instantiate(OmegaConf.load(TINY_BACKBONE), frozen_stages=4)  # nothing trainable
    net = CAMNet(backbone, num_classes=NUM_CLASSES - 1).train()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        sal = gradient_saliency(net, x, (4, 4), stage=1)
    assert sal.shape == (4, 4) and sal.max() > 0
    assert net.training and net.backbone.frozen_stages == 4
    assert not any(stage._forward_hooks for stage in net.backbone.stages)
    net.eval()
    np.testing.assert_allclose(sal, reference_saliency(net, x[0], 1), rtol=1e-5, atol=1e-9)


def test_gradient_saliency_with_a_conta_context_net():
    # M injected into layer4's input, so it shapes the gradient at layer3's output.
    g = torch.Generator().manual_seed(0)
    context = ContextModule(torch.rand(4, 8, 8, generator=g), torch.full((4,), 0.25))
    net = tiny_net(context=context, inject_at="layer4_in")
    with torch.no_grad():  # the M input channel starts at zero weight: make it matter
        net.backbone.stage4[0].conv1.weight[:, -1] = 0.5
    x = torch.randn(3, 32, 32)
    frame = torch.from_numpy(frame_grid(32, 32)).permute(2, 0, 1)
    mask = torch.zeros(8, 8)
    a = gradient_saliency(net, x, (4, 4), context_mask=mask, frame=frame)
    assert a.shape == (4, 4) and (a >= 0).all()
    # M reaches the map: through the frame (a mirrored frame mirrors M) and as a whole
    flipped = gradient_saliency(net, x, (4, 4), context_mask=mask, frame=frame.flip(-1))
    assert not np.allclose(a, flipped, rtol=0, atol=1e-4)
    net.ablate_context = True  # M forced to zero
    no_m = gradient_saliency(net, x, (4, 4), context_mask=mask, frame=frame)
    assert np.abs(a - no_m).max() > 0.05 * a.max()
    with pytest.raises(ContextInputError):
        gradient_saliency(net, x, (4, 4), context_mask=mask)


# -- files -----------------------------------------------------------------------------------
def some_cues(grid=(4, 5), labels=(2, 4)) -> np.ndarray:
    rng = np.random.default_rng(1)
    cues = np.zeros((NUM_CLASSES, *grid), bool)
    for c in (0, *labels):
        cues[c] = rng.random(grid) < 0.3
    return cues


def test_write_read_round_trip(tmp_path):
    cues = some_cues()
    path = tmp_path / "cues" / "img1.npz"
    write_cues(path, cues, [4, 2], data_name="voc", num_classes=NUM_CLASSES)
    assert [p.name for p in path.parent.iterdir()] == ["img1.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as z:
        assert z["keys"].tolist() == [0, 2, 4] and z["keys"].dtype == np.int16
        assert z["cues"].dtype == bool and z["cues"].shape == (3, 4, 5)
        assert z["grid"].tolist() == [4, 5] and int(z["num_classes"]) == NUM_CLASSES
        assert str(z["data_name"]) == "voc"
    back = read_cues(
        path,
        data_name="voc",
        num_classes=NUM_CLASSES,
        grid=(4, 5),
        labels=[2, 4],
        producer="make_cues",
    )
    assert back.dtype == bool and np.array_equal(back, cues)
    # without labels: no class check; an image with no class keeps its background
    assert np.array_equal(
        read_cues(path, data_name="voc", num_classes=5, grid=(4, 5), producer="make_cues"), cues
    )
    empty = some_cues(labels=())
    write_cues(tmp_path / "e.npz", empty, [], data_name="voc", num_classes=NUM_CLASSES)
    back = read_cues(
        tmp_path / "e.npz",
        data_name="voc",
        num_classes=5,
        grid=(4, 5),
        labels=[],
        producer="make_cues",
    )
    assert np.array_equal(back, empty)


def test_write_refuses_cues_outside_the_labels(tmp_path):
    cues = some_cues(labels=(2, 4))
    with pytest.raises(ValueError, match=r"\[4\]"):
        write_cues(tmp_path / "x.npz", cues, [2], data_name="voc", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="shape"):
        write_cues(tmp_path / "x.npz", cues[:3], [2], data_name="voc", num_classes=NUM_CLASSES)
    assert not (tmp_path / "x.npz").exists()


def _tampered(path: Path, **changes) -> Path:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


BAD_FILES = {
    # name: (tamper, expected message part)
    "missing": (lambda p: p.unlink(), "is missing"),
    "not an npz": (lambda p: p.write_bytes(b"\x00garbage"), "unreadable"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:40]), "unreadable"),
    "unknown array": (lambda p: _tampered(p, extra=np.zeros(2)), "unknown arrays"),
    "missing array": (lambda p: _tampered(p, grid=None), "missing arrays"),
    "float cues": (lambda p: _tampered(p, cues=np.zeros((3, 4, 5), np.float32)), "dtype"),
    "object array": (
        lambda p: np.savez(p, **{"keys": np.array([0, 2, 4], dtype=object)}),
        "unreadable",
    ),
    "cue values": (lambda p: _tampered(p, cues=np.full((3, 4, 5), 2, np.uint8)), "0/1"),
    "shape": (lambda p: _tampered(p, cues=np.zeros((2, 4, 5), bool)), "do not fit"),
    "grid shape": (lambda p: _tampered(p, grid=np.array([4, 5, 1])), "shapes"),
    "other data set": (lambda p: _tampered(p, data_name=np.asarray("coco")), "'coco'"),
    "other class count": (
        lambda p: _tampered(p, num_classes=np.asarray(81, np.int32)),
        "81 classes",
    ),
    "other grid": (
        lambda p: _tampered(p, grid=np.array([2, 10]), cues=np.zeros((3, 2, 10), bool)),
        "(2, 10) grid",
    ),
    "no background key": (lambda p: _tampered(p, keys=np.array([1, 2, 4], np.int16)), "0 (back"),
    "key out of range": (lambda p: _tampered(p, keys=np.array([0, 2, 9], np.int16)), "[1, 4]"),
    "repeated key": (lambda p: _tampered(p, keys=np.array([0, 2, 2], np.int16)), "repeat"),
    "other classes": (lambda p: _tampered(p, keys=np.array([0, 1, 4], np.int16)), "other labels"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_cue_file_is_refused_naming_the_file_and_the_fix(case, tmp_path):
    tamper, message = BAD_FILES[case]
    path = tmp_path / "img7.npz"
    write_cues(path, some_cues(), [2, 4], data_name="voc", num_classes=NUM_CLASSES)
    tamper(path)
    with pytest.raises(MissingArtifactError) as err:
        read_cues(
            path,
            data_name="voc",
            num_classes=NUM_CLASSES,
            grid=(4, 5),
            labels=[2, 4],
            producer="make_cues",
        )
    text = str(err.value)
    assert str(path) in text and "make_cues (force=[make_cues])" in text
    assert message in text


def test_cue_file_checked_against_the_images_labels(tmp_path):
    path = tmp_path / "a.npz"
    write_cues(path, some_cues(), [2, 4], data_name="voc", num_classes=NUM_CLASSES)
    for labels in ([2], [2, 3, 4], [1, 2]):
        with pytest.raises(MissingArtifactError, match="other labels"):
            read_cues(
                path,
                data_name="voc",
                num_classes=NUM_CLASSES,
                grid=(4, 5),
                labels=labels,
                producer="make_cues",
            )


# -- statistics ------------------------------------------------------------------------------
def test_cue_stats_counts_shares_and_empty_foreground_cues():
    fg1 = np.zeros((NUM_CLASSES, 2, 2), bool)
    fg1[1, 0, 0] = fg1[3, 0, 0] = fg1[3, 0, 1] = True  # classes 1 and 3 share a cell
    bg1 = np.array([[True, False], [True, False]])  # overlaps fg at (0, 0)
    fg2 = np.zeros((NUM_CLASSES, 2, 2), bool)  # image 2: classes 2 and 4, both without a cue
    bg2 = np.array([[True, False], [False, False]])
    stats = CueStats(max_examples=1)
    stats.update("a", fg1, bg1, [1, 3])
    stats.update("b", fg2, bg2, np.array([4, 2]))
    s = stats.summary()
    # cells: 8. bg: 3, fg: 2 (cells with any class), overlap: 1, none: 8 - (3 + 2 - 1) = 4
    assert s["images"] == 2 and s["cells"] == 8
    assert s["background_share"] == 3 / 8 and s["foreground_share"] == 2 / 8
    assert s["overlap_share"] == 1 / 8 and s["none_share"] == 4 / 8
    assert s["labelled_pairs"] == 4 and s["empty_foreground"] == 2
    assert s["empty_foreground_per_class"] == {"2": 1, "4": 1}
    assert s["empty_foreground_examples"] == [["b", 4]]  # capped at max_examples
    assert cue_stats([("a", fg1, bg1, [1, 3]), ("b", fg2, bg2, [4, 2])], 1) == s
    # merge: two accumulators give the same as one
    one, two = CueStats(max_examples=1), CueStats(max_examples=1)
    one.update("a", fg1, bg1, [1, 3])
    two.update("b", fg2, bg2, [4, 2])
    assert one.merge(two).summary() == s


def test_cue_stats_refuses_a_cue_of_an_unlabelled_class():
    fg = np.zeros((NUM_CLASSES, 2, 2), bool)
    fg[2, 1, 1] = True
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        CueStats().update("x", fg, np.zeros((2, 2), bool), [1])
