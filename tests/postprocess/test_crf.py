import dataclasses
import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from src.postprocess.crf import (
    DEEPLAB_CRF,
    IRNET_LABEL_CRF,
    CRFParams,
    crf_labels,
    crf_probs,
    make_ir_label,
    run_parallel,
)
from tests.conftest import compose_cfg


def _striped_image(h=32, w=36, bounds=(12, 24), seed=0):
    """Three vertical strips of very different colour, plus mild noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.int16)
    image[:, : bounds[0]] = (20, 30, 40)
    image[:, bounds[0] : bounds[1]] = (120, 110, 100)
    image[:, bounds[1] :] = (240, 230, 220)
    image += rng.integers(-4, 5, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _crf_item(seed: int) -> np.ndarray:
    """Module-level (picklable) work item for run_parallel: one noisy IR-label CRF."""
    image = _striped_image(seed=seed)
    rng = np.random.default_rng(seed)
    labels = np.zeros(image.shape[:2], np.int64)
    labels[:, 12:] = 1
    noisy = np.where(rng.random(labels.shape) < 0.1, 1 - labels, labels)
    return crf_labels(image, noisy, 2)


def test_presets_match_the_reference_code():
    assert dataclasses.astuple(IRNET_LABEL_CRF) == (10, 3, 3, 50, 5, 10, 0.7)
    assert dataclasses.astuple(DEEPLAB_CRF)[:6] == (10, 1, 3, 67, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        IRNET_LABEL_CRF.iterations = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="gt_prob"):
        CRFParams(10, 3, 3, 50, 5, 10, gt_prob=1.0)


def test_crf_labels_keeps_a_clean_two_region_image():
    image = _striped_image(bounds=(18, 18))
    labels = np.zeros(image.shape[:2], np.int64)
    labels[:, 18:] = 1
    out = crf_labels(image, labels, 2)
    assert out.dtype == np.uint8
    assert np.array_equal(out, labels)


def test_crf_labels_removes_salt_noise():
    clean = np.zeros((32, 36), np.int64)
    clean[:, 12:] = 1
    assert (_crf_item(3) == clean).mean() > 0.99


def test_crf_probs_returns_normalised_refined_probabilities():
    image = _striped_image(bounds=(18, 18))
    rng = np.random.default_rng(1)
    # Weakly informative softmax: 0.55 for the true region's class, noise on top.
    probs = np.full((3, *image.shape[:2]), 0.2, np.float32)
    probs[0, :, :18] = probs[1, :, 18:] = 0.6
    probs += rng.uniform(0, 0.3, probs.shape).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    refined = crf_probs(image, probs)
    assert refined.dtype == np.float32 and refined.shape == probs.shape
    assert np.allclose(refined.sum(0), 1, atol=1e-5) and refined.min() >= 0
    truth = np.zeros(image.shape[:2], np.int64)
    truth[:, 18:] = 1
    assert (refined.argmax(0) == truth).all()


def test_run_parallel_equals_inline_and_keeps_order():
    seeds = list(range(6))
    inline = run_parallel(_crf_item, seeds, workers=1)
    pooled = run_parallel(_crf_item, seeds, workers=2, chunksize=2)
    assert len(pooled) == len(seeds)
    for a, b in zip(inline, pooled, strict=True):
        assert np.array_equal(a, b)
    assert run_parallel(abs, [-1, 2, -3], workers=8) == [1, 2, 3]  # workers > items
    assert run_parallel(abs, [], workers=2) == []


def test_make_ir_label_hand_checked_toy():
    # Strips: left has no CAM (confident bg), middle 0.15 (between the thresholds -> ignore),
    # right 0.9 (confident fg of class 15).
    image = _striped_image()
    cams = np.zeros((1, *image.shape[:2]), np.float32)
    cams[0, :, 12:24] = 0.15
    cams[0, :, 24:] = 0.9
    out = make_ir_label(image, cams, [15])
    assert out.dtype == np.uint8
    assert (out[:, :12] == 0).all()
    assert (out[:, 12:24] == 255).all()
    assert (out[:, 24:] == 15).all()


def test_make_ir_label_values_are_bg_keys_or_ignore():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
    cams = rng.random((3, 24, 28)).astype(np.float32) ** 2
    keys = [4, 11, 20]
    out = make_ir_label(image, cams, keys)
    assert set(np.unique(out).tolist()) <= {0, 255, *keys}
    # An image without classes is background everywhere.
    empty = make_ir_label(image, np.zeros((0, 24, 28), np.float32), [])
    assert (empty == 0).all()


def test_non_contiguous_inputs_give_the_same_result():
    image = _striped_image()
    flipped = image[:, ::-1]
    labels = np.zeros(image.shape[:2], np.int64)
    labels[:, :12] = 1
    labels_view = labels[:, ::-1]
    assert not flipped.flags.c_contiguous
    expected = crf_labels(np.ascontiguousarray(flipped), np.ascontiguousarray(labels_view), 2)
    assert np.array_equal(crf_labels(flipped, labels_view, 2), expected)


def test_bad_inputs_raise_clear_errors():
    image = _striped_image()
    labels = np.zeros(image.shape[:2], np.int64)
    probs = np.full((2, *image.shape[:2]), 0.5, np.float32)
    with pytest.raises(ValueError, match="does not match"):
        crf_labels(image, labels[:-1], 2)
    with pytest.raises(TypeError, match="uint8"):
        crf_labels(image.astype(np.float32), labels, 2)
    with pytest.raises(ValueError, match="HxWx3"):
        crf_labels(image[..., 0], labels, 2)
    with pytest.raises(ValueError, match="must lie in"):
        crf_labels(image, labels + 2, 2)
    with pytest.raises(TypeError, match="integer"):
        crf_labels(image, labels.astype(np.float32), 2)
    bad = probs.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        crf_probs(image, bad)
    with pytest.raises(ValueError, match="non-negative"):
        crf_probs(image, probs - 1)
    with pytest.raises(ValueError, match="probs must be"):
        crf_probs(image, probs[:, :-1])
    with pytest.raises(ValueError, match="keys"):
        make_ir_label(image, probs, [1])
    with pytest.raises(ValueError, match="1-based"):
        make_ir_label(image, probs, [0, 1])
    with pytest.raises(ValueError, match="cams must be"):
        make_ir_label(image, probs[:, :, :-1], [1, 2])


GOOD_BLOCK = {
    "iterations": 10,
    "gaussian_sxy": 3,
    "gaussian_compat": 3,
    "bilateral_sxy": 80,
    "bilateral_srgb": 13,
    "bilateral_compat": 10,
}


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("iterations", 0, "int >= 1"),
        ("iterations", 2.5, "int >= 1"),
        ("iterations", True, "int >= 1"),
        ("gaussian_sxy", 0, "> 0"),
        ("bilateral_sxy", -80, "> 0"),
        ("bilateral_srgb", float("inf"), "finite"),
        ("bilateral_srgb", float("nan"), "finite"),
        ("gaussian_compat", -1, ">= 0"),
        ("bilateral_compat", float("nan"), "finite"),
        ("bilateral_compat", "10", "finite"),
        ("gt_prob", 0.0, r"\(0, 1\)"),
    ],
)
def test_bad_crf_values_name_the_field_and_the_value(field, value, problem):
    shown = re.escape(repr(value) if isinstance(value, str) else str(value))
    with pytest.raises(ValueError, match=rf"^{field}={shown}: .*{problem}"):
        CRFParams(**{**GOOD_BLOCK, field: value})
    with pytest.raises(ValueError, match=rf"^seeded\.test_crf\.{field}={shown}: .*{problem}"):
        CRFParams.from_config({**GOOD_BLOCK, field: value}, "seeded.test_crf")


def test_from_config_names_the_block_for_unknown_and_missing_keys():
    assert CRFParams.from_config(GOOD_BLOCK, "seeded.test_crf") == CRFParams(**GOOD_BLOCK)
    # a DictConfig, interpolations resolved, as the stages pass it
    cfg = OmegaConf.create({"sxy": 67, "crf": {**GOOD_BLOCK, "bilateral_sxy": "${sxy}"}})
    assert CRFParams.from_config(cfg.crf, "segmenter.crf").bilateral_sxy == 67
    with pytest.raises(
        ValueError, match=r"^segmenter\.crf\.scale_factor: unknown .*'scale_factor'"
    ):
        CRFParams.from_config({**GOOD_BLOCK, "scale_factor": 12}, "segmenter.crf")
    partial_block = {k: v for k, v in GOOD_BLOCK.items() if k != "bilateral_srgb"}
    with pytest.raises(ValueError, match=r"^affinity\.ir_label\.crf\.bilateral_srgb is not set"):
        CRFParams.from_config(partial_block, "affinity.ir_label.crf")
    with pytest.raises(ValueError, match=r"^seeded\.module\.crf must be a mapping"):
        CRFParams.from_config(None, "seeded.module.crf")
    # gt_prob has a default: a block without it is complete
    assert CRFParams.from_config(GOOD_BLOCK, "x").gt_prob == 0.7


def test_every_config_crf_block_builds():
    """The shipped recipes' CRF blocks pass the stricter checks."""
    blocks = {
        "irnet": ["segmenter.crf", "affinity.ir_label.crf"],
        "seam": ["affinity.psa_label.crf"],
        "sec": ["seeded.test_crf", "seeded.module.crf"],
        "dsrg": ["seeded.test_crf", "seeded.module.crf"],
    }
    for method, wheres in blocks.items():
        for scale in ("cpu", "paper"):
            cfg = compose_cfg([f"method={method}", f"scale={scale}"])
            for where in wheres:
                CRFParams.from_config(OmegaConf.select(cfg, where), where)
