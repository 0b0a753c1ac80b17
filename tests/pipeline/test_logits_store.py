"""Segmenter logits kept for the CRF (src/postprocess/logits_store.py): the plausible classes
only, as float16 logits or uint8 log-probabilities, read back through an allow-list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.pipeline.stages.segmenter import read_logits
from src.postprocess.crf import crf_refine_logits
from src.postprocess.logits_store import decode_logits, encode_logits
from src.utils.errors import MissingArtifactError
from src.utils.io import atomic_save_npz


def _logits(num_classes: int = 21, seed: int = 0) -> np.ndarray:
    """Stride-8 logits of an image with two confident regions (classes 0 and 7) on 21 classes."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-8.0, 1.0, (num_classes, 6, 8)).astype(np.float32)
    logits[0, :, :4] += 16.0
    logits[7, :, 4:] += 16.0
    logits[3, 0, 0] += 14.0  # plausible at one cell only
    return logits


def _fail(message: str) -> None:
    raise ValueError(message)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_the_kept_classes_hold_every_argmax_and_nothing_below_the_floor(dtype):
    logits = _logits()
    arrays = encode_logits(logits, dtype, 1e-6)
    values, classes = decode_logits(arrays, 21, _fail)
    assert set(classes.tolist()) >= {0, 3, 7} and len(classes) < 21
    np.testing.assert_array_equal(classes[values.argmax(0)], logits.argmax(0))
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    dropped = sorted(set(range(21)) - set(classes.tolist()))
    assert probs[dropped].max() < 1e-6
    kept = torch.softmax(torch.from_numpy(values), 0).numpy()
    np.testing.assert_allclose(kept, probs[classes], atol=0.03)  # uint8: 0.054-nat steps


def test_min_prob_0_keeps_every_class_as_computed():
    arrays = encode_logits(_logits(), "float16", 0.0)
    values, classes = decode_logits(arrays, 21, _fail)
    assert classes.tolist() == list(range(21))
    np.testing.assert_array_equal(values, _logits().astype(np.float16).astype(np.float32))


def test_the_crf_of_the_stored_classes_matches_the_crf_of_all():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    full = crf_refine_logits(image, torch.from_numpy(_logits()))
    for dtype in ("float16", "uint8"):
        values, classes = decode_logits(encode_logits(_logits(), dtype, 1e-6), 21, _fail)
        stored = classes[crf_refine_logits(image, torch.from_numpy(values))]
        assert (stored == full).mean() > 0.999, dtype


def test_settings_that_cannot_work_name_the_key():
    with pytest.raises(ValueError, match="logits_dtype='int4'"):
        encode_logits(_logits(), "int4", 1e-6)
    with pytest.raises(ValueError, match="logits_min_prob=0.0.*uint8"):
        encode_logits(_logits(), "uint8", 0.0)


def test_files_round_trip_and_older_files_hold_every_class(tmp_path):
    atomic_save_npz(tmp_path / "a.npz", compress=True, **encode_logits(_logits(), "uint8", 1e-6))
    values, ids = read_logits(tmp_path / "a.npz", 21)
    assert values.dtype == np.float32 and len(ids) == len(values) < 21
    atomic_save_npz(tmp_path / "old.npz", logits=_logits().astype(np.float16))
    assert read_logits(tmp_path / "old.npz", 21)[1].tolist() == list(range(21))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"classes": np.array([0, 0, 1], np.int16)}, "do not fit"),
        ({"classes": np.array([0, 1, 21], np.int16)}, "do not fit"),
        ({"classes": np.array([0, 1], np.int16)}, "do not fit"),
        ({"logits": np.zeros((3, 4, 4), np.uint8)}, "scale"),
        ({"logits": np.zeros((3, 4, 4), np.uint8), "scale": np.float32(-1)}, "scale"),
    ],
)
def test_files_that_do_not_fit_are_refused_naming_the_file(tmp_path, arrays, message):
    base = {"logits": np.zeros((3, 4, 4), np.float16), "classes": np.array([0, 1, 2], np.int16)}
    atomic_save_npz(tmp_path / "b.npz", **{**base, **arrays})
    with pytest.raises(MissingArtifactError, match=rf"b\.npz.*{message}.*predict_segmenter"):
        read_logits(tmp_path / "b.npz", 21)


def test_what_the_writer_stores_the_reader_accepts():
    """d04b298: a NaN segmenter's logits were stored with no class, which the reader (rightly)
    refuses. Non-finite logits are refused at writing; a floor above 1 / C still keeps every
    pixel's argmax class."""
    fail = pytest.fail
    with pytest.raises(ValueError, match="non-finite logits"):
        encode_logits(np.full((21, 4, 4), np.nan, np.float32), "uint8", 1e-6)
    flat = np.zeros((21, 4, 4), np.float32)  # every class at 1 / 21 < the floor of 0.5
    for dtype in ("uint8", "float16"):
        arrays = encode_logits(flat, dtype, 0.5)
        _, classes = decode_logits(arrays, 21, fail)
        assert len(classes) >= 1
