"""cam_to_label (IRNet's eval_cam rule) and the one-pass ThresholdSweep."""

import numpy as np
import pytest
import torch

from src.evaluation.cam import ThresholdSweep, cam_to_label
from src.evaluation.metrics import SegmentationMetric


def _irnet_eval_cam(cams, keys, thr):
    """IRNet's formulation: pad a constant background plane in front, argmax, map by keys."""
    cams = np.asarray(cams, dtype=np.float32)
    padded = np.concatenate([np.full((1, *cams.shape[1:]), thr, np.float32), cams])
    return np.concatenate([[0], keys])[padded.argmax(0)].astype(np.uint8)


def _random_image(rng, c=6, h=20, w=24):
    k = int(rng.integers(0, 4))
    keys = np.sort(rng.choice(np.arange(1, c), k, replace=False))
    cams = (rng.integers(0, 12, (k, h, w)) / 20).astype(np.float16)  # coarse values: many ties
    target = rng.integers(0, c, (h, w))
    target[rng.random((h, w)) < 0.1] = 255
    context = rng.integers(0, c, (h, w))
    return cams, keys, target, context


def test_cam_to_label_hand_case_and_empty():
    cams = np.array([[[0.9, 0.1, 0.15]], [[0.5, 0.4, 0.1]]], dtype=np.float32)  # K=2, 1x3
    label = cam_to_label(cams, np.array([3, 7]), 0.15)
    np.testing.assert_array_equal(label, [[3, 7, 0]])  # 0.15 == threshold -> background
    assert label.dtype == np.uint8
    empty = cam_to_label(np.zeros((0, 4, 5), np.float32), np.zeros(0, np.int64), 0.15)
    assert empty.shape == (4, 5) and not empty.any()


def test_cam_to_label_matches_irnet_formulation_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cams, keys, _, _ = _random_image(rng)
        for thr in (0.0, 0.15, 0.3):
            np.testing.assert_array_equal(
                cam_to_label(cams, keys, thr), _irnet_eval_cam(cams, keys, thr)
            )


def test_cam_to_label_rejects_bad_keys():
    with pytest.raises(ValueError, match="keys"):
        cam_to_label(np.zeros((2, 3, 3)), np.array([1]), 0.1)
    with pytest.raises(ValueError, match="1-based"):
        cam_to_label(np.zeros((1, 3, 3)), np.array([0]), 0.1)


def test_sweep_finds_best_threshold_on_constructed_example():
    # Object (class 2) pixels have CAM 0.5, background pixels 0.3: any thr in [0.3, 0.5) is perfect.
    target = np.zeros((4, 4), np.uint8)
    target[:2] = 2
    cams = np.where(target == 2, 0.5, 0.3)[None].astype(np.float32)
    sweep = ThresholdSweep([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], num_classes=3)
    sweep.update(cams, np.array([2]), target)
    out = sweep.compute()
    assert out["thresholds"] == [0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6]  # configured one added
    assert out["best_threshold"] == 0.3  # first of the ties; 0.3 == CAM value -> background
    assert out["best_miou"] == pytest.approx(1.0)
    assert out["miou"] == pytest.approx(out["at_configured"]["miou"])
    # At 0.15 everything is class 2 (IoU bg 0, obj 8/16); at 0.5 and 0.6 everything is background.
    assert out["miou"] == pytest.approx((0.0 + 0.5) / 2)
    assert out["miou_per_threshold"][-2:] == pytest.approx([0.25, 0.25])
    assert out["at_best"]["incomplete_background"] == 0.0


def test_sweep_equals_direct_metric_on_cam_to_label():
    rng = np.random.default_rng(3)
    c = 6
    thresholds = [0.0, 0.1, 0.2, 0.25, 0.35, 0.5]
    sweep = ThresholdSweep(thresholds, num_classes=c, configured_threshold=0.15)
    direct = {t: SegmentationMetric(c) for t in [*thresholds, 0.15]}
    for i in range(12):
        cams, keys, target, context = _random_image(rng, c)
        if i % 2:  # torch inputs take the same path
            cams, keys, target = torch.from_numpy(cams), torch.from_numpy(keys), target
        sweep.update(cams, keys, target, context)
        for t, m in direct.items():
            m.update(cam_to_label(np.asarray(cams), np.asarray(keys), t), target, context)
    out = sweep.compute()
    for t, m in direct.items():
        k = out["thresholds"].index(t)
        np.testing.assert_array_equal(sweep.confmat[k].numpy(), m.confmat.numpy())
        np.testing.assert_array_equal(sweep.context[k].numpy(), m.context.numpy())
        assert out["miou_per_threshold"][k] == m.compute()["miou"]
    assert out["at_configured"] == direct[0.15].compute()
    assert out["at_best"] == direct[out["best_threshold"]].compute()


def test_sweep_rejects_mismatched_shapes():
    sweep = ThresholdSweep(num_classes=3)
    with pytest.raises(ValueError, match="cams"):
        sweep.update(np.zeros((1, 3, 3)), [1], np.zeros((3, 4), np.uint8))
