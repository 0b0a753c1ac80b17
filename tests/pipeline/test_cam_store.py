"""CAM files in uint8 (cam.inference.store): thresholds on the 0.005 grid decide as on the
computed maps, and a file that is not a CAM of either store is refused naming it."""

from __future__ import annotations

import numpy as np
import pytest

from src.pipeline.stages.cam import CAM_LEVELS, cam_encoder, decode_cam, load_cam
from src.utils.errors import MissingArtifactError
from src.utils.io import atomic_save_npz


def _maps(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    high = rng.random((2, 37, 41)).astype(np.float32)
    high[0, :5] = 0.0  # background stays exactly 0
    high[1, 0, 0] = 1.0  # the normalised peak
    grid = np.arange(0, 1.0001, 0.005, dtype=np.float32)  # values on the thresholds themselves
    high[0, 10, : len(grid[:41])] = grid[:41]
    return {"keys": np.array([1, 3], np.int16), "cam": high[:, ::4, ::4].copy(), "high_res": high}


def test_uint8_keeps_every_decision_on_the_threshold_grid():
    maps = _maps()
    stored = decode_cam(cam_encoder("uint8")(maps))
    for key in ("cam", "high_res"):
        x, y = maps[key], stored[key]
        assert y.dtype == np.float32 and np.abs(x - y).max() <= 0.5 / CAM_LEVELS + 1e-7
        for t in np.arange(0, 1.0, 0.005):
            np.testing.assert_array_equal(x > t, y > t, err_msg=f"{key} at {t:.3f}")
    assert (stored["high_res"][0, :5] == 0).all()


def test_float16_store_is_the_computed_maps_in_half_precision():
    maps = _maps(1)
    stored = decode_cam(cam_encoder("float16")(maps))
    np.testing.assert_array_equal(stored["high_res"], maps["high_res"].astype(np.float16))


def test_an_unknown_store_names_the_key():
    with pytest.raises(ValueError, match=r"cam.inference.store='int4'.*uint8.*float16"):
        cam_encoder("int4")


@pytest.mark.parametrize(
    "bad", [np.full((2, 10, 11), 3, np.uint16), np.full((2, 10, 11), CAM_LEVELS + 1, np.uint8)]
)
def test_a_file_that_is_no_cam_of_either_store_is_refused(tmp_path, bad):
    arrays = cam_encoder("uint8")(_maps())
    arrays["high_res"] = bad
    atomic_save_npz(tmp_path / "x.npz", compress=True, **arrays)
    with pytest.raises(MissingArtifactError, match=r"x\.npz.*not a uint8 CAM.*force=\[make_cams\]"):
        load_cam(tmp_path, "x")


def _bad_keys(keys):
    def change(arrays):
        arrays["keys"] = np.array(keys, np.int16)

    return change


def _float_map(value):
    def change(arrays):
        arrays["high_res"] = arrays["high_res"].astype(np.float16)
        arrays["high_res"][1, 3, 4] = value

    return change


def _planes(n):
    def change(arrays):
        arrays["cam"] = arrays["cam"][:n]

    return change


BAD_CAMS = {
    "repeated keys": (_bad_keys([3, 3]), r"keys \[3, 3\] repeat a class"),
    "a 0 key": (_bad_keys([0, 3]), r"keys \[0, 3\] must be 1-based object class ids"),
    "a key past 254": (
        _bad_keys([1, 255]),
        r"keys \[1, 255\] must be 1-based object class ids in 1..254",
    ),
    "keys as a matrix": (_bad_keys([[1, 3]]), r"array 'keys' has shape \(1, 2\)"),
    "a float above 1": (_float_map(7.5), r"array 'high_res' spans \[0, 7.5\], expected \[0, 1\]"),
    "a negative float": (_float_map(-2.0), r"array 'high_res' spans \[-2, 1\]"),
    "NaN": (_float_map(np.nan), r"array 'high_res' contains NaN or inf"),
    "inf": (_float_map(np.inf), r"array 'high_res' contains NaN or inf"),
    "a plane missing": (_planes(1), r"array 'cam' has shape \(1, 10, 11\), expected \(2, H, W\)"),
}


@pytest.mark.parametrize("change, problem", list(BAD_CAMS.values()), ids=list(BAD_CAMS))
def test_a_cam_file_make_cams_could_not_have_written_is_refused_naming_it(
    tmp_path, change, problem
):
    arrays = cam_encoder("float16")(_maps())
    change(arrays)
    atomic_save_npz(tmp_path / "x.npz", **arrays)
    with pytest.raises(MissingArtifactError, match=rf"x\.npz: {problem}.*force=\[make_cams\]"):
        load_cam(tmp_path, "x")
    with pytest.raises(ValueError):  # what the readers' own NaN checks raised
        load_cam(tmp_path, "x")
