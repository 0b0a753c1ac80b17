"""SegmentationMetric: hand-computed cases, an independent numpy reference, errors, context."""

import numpy as np
import pytest
import torch

from src.evaluation.metrics import SegmentationMetric


def _reference(pred, target, num_classes, ignore=255):
    """Independent per-class IoU by explicit masks (no confusion matrix)."""
    valid = target != ignore
    ious = []
    for c in range(num_classes):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        ious.append(inter / union if union else None)
    return ious


def test_hand_computed_confusion_and_miou():
    target = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 0, 2]], dtype=np.uint8)  # the 2 on the 255 pixel is ignored
    m = SegmentationMetric(4, class_names=["bg", "a", "b", "c"])
    m.update(pred, target)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(m.confusion, expected)
    assert m.confusion.dtype == np.int64
    out = m.compute()
    assert out["per_class_iou"] == pytest.approx({"bg": 1 / 3, "a": 2 / 3, "b": 0.0, "c": None})
    assert out["miou"] == pytest.approx(1 / 3)  # class "c" absent from GT and pred: excluded
    assert out["pixel_accuracy"] == pytest.approx(3 / 5)
    assert out["num_pixels"] == 5


def test_class_only_in_prediction_counts_with_iou_zero():
    target = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 2], [1, 1]])  # class 2 predicted, never in GT: union > 0 -> IoU 0
    m = SegmentationMetric(3)
    m.update(pred, target)
    res = m.compute()
    assert res["per_class_iou"]["class_2"] == 0.0
    assert res["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_agrees_with_numpy_reference_on_random_data():
    rng = np.random.default_rng(0)
    c = 7
    target = rng.integers(0, c, (6, 40, 50))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 5] = 0  # class 5 absent from GT ...
    pred = rng.integers(0, c, target.shape)
    pred[pred == 6] = 0
    target[target == 6] = 0  # ... class 6 absent from both
    m = SegmentationMetric(c)
    m.update(pred, target)
    ref = _reference(pred, target, c)
    got = m.compute()
    assert list(got["per_class_iou"].values()) == pytest.approx(ref)
    assert got["per_class_iou"]["class_6"] is None
    assert got["miou"] == pytest.approx(np.mean([v for v in ref if v is not None]))
    valid = target != 255
    conf = np.zeros((c, c), dtype=np.int64)
    np.add.at(conf, (target[valid], pred[valid]), 1)
    np.testing.assert_array_equal(m.confusion, conf)


def test_error_decomposition_on_constructed_case():
    # 10 background pixels, 6 of class 1, 4 of class 2.
    target = np.array([0] * 10 + [1] * 6 + [2] * 4)
    pred = np.array(
        [1, 1, 1]
        + [0] * 7  # background: 3 false objects
        + [0, 0, 2, 1, 1, 1]  # class 1: 2 missed, 1 confused with class 2
        + [0, 2, 2, 2]  # class 2: 1 missed
    )
    m = SegmentationMetric(3)
    m.update(pred, target)
    out = m.compute()
    assert out["incomplete_foreground"] == pytest.approx(3 / 10)
    assert out["object_ambiguity"] == pytest.approx(1 / 10)
    assert out["incomplete_background"] == pytest.approx(3 / 10)
    assert out["error_shares"] == pytest.approx(
        {"incomplete_foreground": 3 / 7, "object_ambiguity": 1 / 7, "incomplete_background": 3 / 7}
    )
    assert out["context_leakage"] is None  # no context map given


def test_context_leakage_on_constructed_case():
    # One row per pixel group. Context 1 = home context of class 1, context 2 = of class 2.
    target = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 255])
    context = np.array([1, 1, 1, 1, 2, 2, 0, 0, 1, 0, 1])
    pred = np.array([1, 1, 0, 0, 2, 0, 1, 0, 1, 1, 1])
    m = SegmentationMetric(3, class_names=["bg", "boat", "train"])
    m.update(pred, target, context)
    out = m.compute()
    # predicted-object pixels with valid GT: idx 0, 1, 4, 6, 8, 9 -> 6; on context with
    # background GT: idx 0, 1 (boat ctx), 4 (train ctx). idx 8 is the object on its own context.
    assert out["context_leakage"] == pytest.approx(3 / 6)
    assert out["context_leakage_per_region"] == pytest.approx({"boat": 2 / 6, "train": 1 / 6})
    # background pixels on context: 6, of which 3 predicted as an object.
    assert out["context_fp_rate"] == pytest.approx(3 / 6)
    assert out["context_fp_rate_per_region"] == pytest.approx({"boat": 2 / 4, "train": 1 / 2})
    assert out["non_context_fp_rate"] == pytest.approx(1 / 2)


def test_context_names_mapping_and_range_check():
    m = SegmentationMetric(3, context_names={1: "water", 2: "rails"})
    m.update(np.array([1, 0]), np.array([0, 0]), np.array([1, 2]))
    assert set(m.compute()["context_leakage_per_region"]) == {"water", "rails"}
    with pytest.raises(ValueError, match="context"):
        m.update(np.array([1, 0]), np.array([0, 0]), np.array([3, 0]))


def test_batching_invariance_and_torch_inputs():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, (8, 16, 16)).astype(np.uint8)
    target = rng.integers(0, 5, (8, 16, 16)).astype(np.uint8)
    target[:, :2] = 255
    context = rng.integers(0, 5, (8, 16, 16))
    once = SegmentationMetric(5)
    once.update(pred, target, context)
    chunked = SegmentationMetric(5)
    for i in range(0, 8, 3):
        chunked.update(torch.from_numpy(pred[i : i + 3]), target[i : i + 3], context[i : i + 3])
    single = SegmentationMetric(5)
    for p, t, c in zip(pred, target, context, strict=True):
        single.update(p, torch.from_numpy(t), c)
    for other in (chunked, single):
        np.testing.assert_array_equal(once.confmat.numpy(), other.confmat.numpy())
        np.testing.assert_array_equal(once.context.numpy(), other.context.numpy())
        assert once.compute() == other.compute()


def test_void_prediction_is_a_miss():
    m = SegmentationMetric(2)
    m.update(np.array([1, 255, 0]), np.array([1, 1, 0]))
    out = m.compute()
    assert out["per_class_iou"]["class_1"] == pytest.approx(1 / 2)
    assert out["void_prediction_rate"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(m.void_predictions, [0, 1])


def test_bad_inputs_raise_clear_errors():
    m = SegmentationMetric(3)
    with pytest.raises(TypeError, match="argmax"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="target"):
        m.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8))
    with pytest.raises(ValueError, match="pred"):
        m.update(np.full((2, 2), 9, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.uint8))


def test_reset_clears_counts():
    m = SegmentationMetric(2)
    m.update(np.array([1, 1]), np.array([0, 1]))
    m.reset()
    m.update(np.array([1]), np.array([1]))
    assert m.compute()["miou"] == 1.0
