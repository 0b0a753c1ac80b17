"""results.json merging (atomic), results.md and the printed rich table."""

import io
import json
import os

import numpy as np
import pytest
from rich.console import Console

from src.evaluation.cam import ThresholdSweep
from src.evaluation.metrics import SegmentationMetric
from src.evaluation.report import (
    load_results,
    print_results,
    render_markdown,
    update_results,
    write_markdown,
)

NAMES = ["background", "boat", "train"]


def _metric(shift: int):
    target = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.roll(target, shift)
    m = SegmentationMetric(3, class_names=NAMES)
    m.update(pred, target, context=np.array([1, 1, 0, 0, 0, 0, 0, 0]))
    return m.compute()


def _sweep():
    target = np.array([[0, 0, 1, 1]])
    sweep = ThresholdSweep([0.1, 0.3], num_classes=3, configured_threshold=0.15, class_names=NAMES)
    sweep.update(np.array([[[0.2, 0.1, 0.9, 0.8]]]), np.array([1]), target)
    return sweep.compute()


def _fill(run_dir):
    update_results(run_dir, 0, "cam", _sweep(), seconds=1.5, experiment="synth_conta", seed=0)
    update_results(run_dir, 0, "seg", _metric(1), seconds={"train_seg": 10.0, "seg": 2.0})
    update_results(run_dir, 1, "cam", _sweep(), seconds=1.0)
    return update_results(run_dir, 1, "seg", _metric(0), seconds=2.5)


def test_update_results_merges_rounds_and_stages(tmp_path):
    results = _fill(tmp_path)
    assert results == load_results(tmp_path)
    assert results["experiment"] == "synth_conta" and results["seed"] == 0
    assert list(results["rounds"]) == ["0", "1"]
    row = results["rounds"]["0"]
    assert row["cam_miou"] == pytest.approx(_sweep()["miou"])
    assert row["cam_best_threshold"] == 0.3 and row["cam_threshold"] == 0.15
    assert row["cam_sweep"]["thresholds"] == [0.1, 0.15, 0.3]
    assert set(row["seg_errors"]) == {
        "incomplete_foreground",
        "object_ambiguity",
        "incomplete_background",
    }
    assert row["seg_context_leakage"] is not None
    assert "cam_context_leakage" not in row  # no context given: absent, not null
    assert row["seg_per_class_iou"]["train"] is not None
    assert row["seconds"] == {"cam": 1.5, "train_seg": 10.0, "seg": 2.0}
    assert results["rounds"]["1"]["seg_miou"] == 1.0
    # Only the two result files: no temp file left behind.
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_failed_write_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    _fill(tmp_path)
    before = (tmp_path / "results.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        update_results(tmp_path, 2, "cam", _sweep())
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_a_value_the_table_cannot_show_leaves_results_json_as_it_was(tmp_path):
    """Rendered before written: a string score fails the update instead of landing in
    results.json, where it made every later update (and rerun) of the run fail."""
    _fill(tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match="format code"):
        update_results(tmp_path, 1, "cam", {"miou": "0.99"})
    assert (tmp_path / "results.json").read_text() == before
    update_results(tmp_path, 1, "pseudo", {"miou": 0.5})  # the run stays usable


def test_nan_becomes_null_and_bad_files_raise(tmp_path):
    update_results(tmp_path, 0, "pseudo", {"miou": float("nan"), "extra": np.float32(0.5)})
    row = json.loads((tmp_path / "results.json").read_text())["rounds"]["0"]
    assert row == {"pseudo_miou": None, "pseudo_extra": 0.5}
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "missing")
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)


def test_markdown_has_rows_change_row_and_per_class(tmp_path):
    results = _fill(tmp_path)
    md = render_markdown(results)
    assert md.startswith("# Results: synth_conta (seed 0)")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Round"))
    for col in ("CAM mIoU", "CAM best", "Pseudo mIoU", "Seg mIoU", "Seg+CRF mIoU", "IF %"):
        assert col in header
    assert "train_seg s" in header and "Total s" in header
    r0 = next(line for line in lines if line.startswith("| 0 |"))
    r1 = next(line for line in lines if line.startswith("| 1 |"))
    assert "| seg |" in r0 and "100.0" in r1  # seg mIoU of round 1 is perfect
    assert "@0.30" in r0  # best CAM threshold
    assert any(line.startswith("| Δ r1−r0") for line in lines)
    assert "## Per-class IoU (%), round 1" in md
    assert any(line.startswith("| boat |") for line in lines)
    assert write_markdown(tmp_path).read_text() == md


def test_print_results_readable_without_tty(tmp_path, capsys):
    results = _fill(tmp_path)
    buf = io.StringIO()
    print_results(results, console=Console(file=buf, force_terminal=False, width=200))
    text = buf.getvalue()
    assert "Seg+CRF mIoU" in text and "\x1b[" not in text
    # Default console on a captured (non-TTY) stdout: widened, so headers are not squashed.
    print_results(results)
    out = capsys.readouterr().out
    assert "Seg+CRF mIoU" in out and "Total s" in out and "boat" in out
    assert "\x1b[" not in out
