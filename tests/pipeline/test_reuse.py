"""Stages copied from another run with the same hash (src/pipeline/reuse.py, `reuse_from`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import open_dict

from src.pipeline import driver, reuse
from src.pipeline.artifacts import StageDir
from src.pipeline.registry import STAGES
from src.pipeline.reuse import (
    REUSE_PREFIX,
    StageRecord,
    finish_rescore,
    pending_rescore,
    reuse_stage,
)
from src.train import train
from tests.conftest import TINY, compose_cfg
from tests.pipeline.conftest import ROUND0, copy_run

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

BASELINE = [s for s in ROUND0 if s != "confounders"]  # conta=off's stages
# Its stages that are copied; the others only score, and are recomputed from the copies.
COPIED = [s for s in BASELINE if STAGES[s].reuse]
SCORING = ["eval_cams", "eval_pseudo", "eval_segmenter"]


def _conta_off(finished_run, tmp_path):
    """A conta=off run of the finished run's recipe, on its data, in another output folder."""
    donor_cfg, _ = finished_run
    cfg = compose_cfg(["experiment=synth_conta", "conta=off", TINY], tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = donor_cfg.paths.data_dir
        cfg.reuse_from = [donor_cfg.paths.run_dir]
    return cfg


def _fail_if_run(monkeypatch, names):
    def boom(ctx):
        raise AssertionError(f"{ctx.name} should have been reused")

    for name in names:
        monkeypatch.setitem(STAGES, name, dataclasses.replace(STAGES[name], run=boom))


def _without_seconds(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def test_conta_off_copies_round_0_of_the_conta_run(finished_run, tmp_path, monkeypatch):
    _, donor_results = finished_run
    cfg = _conta_off(finished_run, tmp_path)
    assert sorted(set(BASELINE) - set(COPIED)) == sorted(SCORING)
    _fail_if_run(monkeypatch, COPIED)
    results = train(cfg)
    assert _without_seconds(results["rounds"]["0"]) == _without_seconds(
        donor_results["rounds"]["0"]
    )
    assert results["conta"] is False and results["experiment"] == cfg.experiment_name
    run_dir, donor_dir = Path(cfg.paths.run_dir), Path(finished_run[0].paths.run_dir)
    for stage in COPIED:
        done = StageDir(run_dir, 0, stage).read_done()
        assert done["reused_from"] == str(StageDir(donor_dir, 0, stage).path)
        for artifact in done["artifacts"]:
            assert (run_dir / "round_0" / stage / artifact).exists()
    for stage in SCORING:  # scored again from the copied artifacts: the same numbers
        assert "reused_from" not in StageDir(run_dir, 0, stage).read_done()
    mask = sorted((run_dir / "round_0/make_pseudo_masks/masks").glob("*.png"))[0]
    donor_mask = donor_dir / "round_0/make_pseudo_masks/masks" / mask.name
    assert mask.stat().st_ino == donor_mask.stat().st_ino  # hard-linked, not duplicated
    assert not list(run_dir.glob(f"round_0/{REUSE_PREFIX}*"))


def test_a_changed_setting_computes_only_the_stages_it_affects(finished_run, tmp_path, monkeypatch):
    cfg = _conta_off(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.segmenter.crf.iterations = 5  # changes crf_segmenter's hash only
    _fail_if_run(monkeypatch, [s for s in COPIED if s != "crf_segmenter"])
    train(cfg)
    done = StageDir(Path(cfg.paths.run_dir), 0, "crf_segmenter").read_done()
    assert "reused_from" not in done and done["config"]["segmenter.crf"]["iterations"] == 5


def test_a_donor_s_forged_score_never_reaches_the_results(finished_run, tmp_path, monkeypatch):
    """A donor whose eval_cams record claims a CAM mIoU of 0.99 (a plausible fraction, so it
    passes the record checks): the score comes from the copied CAMs, not from the record."""
    _, donor_results = finished_run
    donor_cfg = copy_run(finished_run, tmp_path / "donor")
    sdir = StageDir(Path(donor_cfg.paths.run_dir), 0, "eval_cams")
    done = sdir.read_done()
    done["results"]["values"]["miou"] = 0.99
    sdir.done_file.write_text(json.dumps(done))
    cfg = _conta_off(finished_run, tmp_path / "recipient")
    with open_dict(cfg):
        cfg.reuse_from = [donor_cfg.paths.run_dir]
    _fail_if_run(monkeypatch, COPIED)
    results = train(cfg)
    assert results["rounds"]["0"]["cam_miou"] == donor_results["rounds"]["0"]["cam_miou"] != 0.99


def _forge(run_dir: Path, round_idx: int, stage: str, key: str, value: float) -> None:
    sdir = StageDir(run_dir, round_idx, stage)
    done = sdir.read_done()
    done["results"]["values"][key] = value
    sdir.done_file.write_text(json.dumps(done))


def test_a_donor_s_forged_crf_score_and_context_diagnostics_are_recomputed(
    finished_run, tmp_path, monkeypatch
):
    """The stages that record scores and are copied (crf_segmenter's seg_crf, train_cam's CONTA
    diagnostics of M): the recipient recomputes both from the copied masks and weights."""
    donor_cfg_, donor_results = finished_run
    donor_cfg = copy_run(finished_run, tmp_path / "donor")
    donor_dir = Path(donor_cfg.paths.run_dir)
    _forge(donor_dir, 0, "crf_segmenter", "miou", 0.99)
    _forge(donor_dir, 1, "crf_segmenter", "miou", 0.99)
    _forge(donor_dir, 1, "train_cam", "alpha_max", 0.99)
    cfg = donor_cfg_.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "recipient")
        cfg.reuse_from = [str(donor_dir)]
    computed = [s for s in ROUND0 if STAGES[s].reuse]
    _fail_if_run(monkeypatch, computed)  # every one of them copied, none trained or refined
    results = train(cfg)
    for round_idx in ("0", "1"):
        row, expected = results["rounds"][round_idx], donor_results["rounds"][round_idx]
        assert row["seg_crf_miou"] == expected["seg_crf_miou"] != 0.99
        assert _without_seconds(row) == _without_seconds(expected)
    assert results["rounds"]["1"]["context"]["alpha_max"] != 0.99
    run_dir = Path(cfg.paths.run_dir)
    for round_idx, stage in [(0, "crf_segmenter"), (1, "crf_segmenter"), (1, "train_cam")]:
        done = StageDir(run_dir, round_idx, stage).read_done()
        assert done["reused_from"] == str(StageDir(donor_dir, round_idx, stage).path)
        assert 0.99 not in done["results"]["values"].values()
        assert not (run_dir / f"round_{round_idx}" / stage / reuse.REUSED_FILE).exists()


def test_empty_reuse_from_computes_everything(finished_run, tmp_path, monkeypatch):
    cfg = _conta_off(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.reuse_from = []
        cfg.stages = ["train_cam"]
    train(cfg)
    assert "reused_from" not in StageDir(Path(cfg.paths.run_dir), 0, "train_cam").read_done()


# -- reuse_stage on hand-made stage folders ------------------------------------------------------
DIGEST = "abc123"
RECORD = StageRecord("make_cams", {}, False).to_json()  # what make_cams records: no values


def _donor(tmp_path, **done) -> StageDir:
    sdir = StageDir(tmp_path / "donor", 0, "make_cams")
    (sdir.path / "cams").mkdir(parents=True)
    (sdir.path / "cams" / "a.npz").write_bytes(b"cam")
    marker = {"stage": "make_cams", "config_hash": DIGEST, "results": RECORD, **done}
    sdir.done_file.write_text(json.dumps(marker))
    return sdir


def _target(tmp_path) -> StageDir:
    sdir = StageDir(tmp_path / "run", 0, "make_cams")
    sdir.path.mkdir(parents=True)
    (sdir.path / "RUNNING.json").write_text("{}")  # an unfinished attempt
    return sdir


@pytest.mark.parametrize(
    "marker",
    [
        {"config_hash": "other"},  # another configuration
        {"results": None},  # written before records existed
        {"results": {"prefix": "cam", "values": "0.5", "nested": False}},  # not plain values
        {"results": {"prefix": 3, "values": {}, "nested": False}},
    ],
)
def test_a_donor_that_does_not_fit_is_not_used(tmp_path, marker):
    donor = _donor(tmp_path, **marker)
    target = _target(tmp_path)
    assert reuse_stage(target, DIGEST, [donor.run_dir, tmp_path / "missing"]) is None
    assert target.read_done() is None and (target.path / "RUNNING.json").exists()


def _forged(values=None, prefix="cam", nested=False, **extra) -> dict:
    values = {"miou": 0.5} if values is None else values
    return {"prefix": prefix, "values": values, "nested": nested, **extra}


# Records the probe forged: each would have reached results.json (a string where a score
# belongs made every later rerun of the run die while rendering results.md).
FORGED = {
    "a string score": _forged({"miou": "0.99"}),
    "a score above 1": _forged({"miou": 1.5}),
    "a negative score": _forged({"best_miou": -0.1}),
    "a NaN score": _forged({"miou": float("nan")}),
    "an infinite number": _forged({"threshold": float("inf")}),
    "a bool score": _forged({"miou": True}),
    "a score that is a dict": _forged({"miou": {"a": 0.5}}),
    "a path prefix": _forged(prefix="../../x"),
    "a prefix with a slash": _forged(prefix="cam/x"),
    "the seconds prefix": _forged(prefix="seconds", nested=True),
    "a path key": _forged({"../x": 0.5}),
    "errors as a list": _forged({"errors": [0.1, 0.2]}),
    "a string class iou": _forged({"per_class_iou": {"cat": "high"}}),
    "a class iou above 1": _forged({"per_class_iou": {"cat": 2.0}}),
    "a raw threshold sweep": _forged({"at_configured": {"miou": 0.5}}),
    "a split that is a path": _forged({"miou": 0.5, "split": "../val"}),
    "a nested record holding a dict": _forged({"alpha_max": {"x": 1}}, prefix="context"),
    "nested as a string": _forged(nested="false"),
    "an unknown record key": _forged(extra=1),
}


@pytest.mark.parametrize("record", list(FORGED.values()), ids=list(FORGED))
def test_a_forged_donor_record_is_refused_with_a_warning(tmp_path, record, caplog):
    donor = _donor(tmp_path, results=record)
    target = _target(tmp_path)
    with caplog.at_level("WARNING", logger="src.pipeline.reuse"):
        assert reuse_stage(target, DIGEST, [donor.run_dir]) is None
    assert target.read_done() is None and not (target.path / "cams").exists()
    assert str(donor.done_file) in caplog.text and "computing the stage" in caplog.text
    assert StageRecord.from_done({"results": record}) is None


def test_the_records_the_stages_write_are_reused(tmp_path):
    """The shapes of eval_cams' (threshold sweep), the CRF's and CONTA's context records."""
    records = [
        _forged(
            {
                "miou": 0.41,
                "threshold": 0.15,
                "best_miou": 0.43,
                "best_threshold": 0.2,
                "errors": {"incomplete_foreground": 0.3, "object_ambiguity": None},
                "per_class_iou": {"background": 0.8, "traffic light": None},
                "context_leakage": 0.02,
                "sweep": {"0.1": 0.4, "0.15": 0.41},
            }
        ),
        _forged(
            {"miou": 0.5, "split": "val", "images": 5, "split_images": 8, "without_crf_miou": 0.4},
            prefix="seg_crf",
        ),
        _forged(
            {"alpha_max": 0.3, "m_spread": 2.5, "images": 24, "inert": False, "gain": -1.0},
            prefix="context",
            nested=True,
        ),
        _forged({}, prefix="train_cam"),  # a stage without a results row
    ]
    for i, record in enumerate(records):
        donor = _donor(tmp_path / str(i), results=record)
        target = _target(tmp_path / str(i))
        assert reuse_stage(target, DIGEST, [donor.run_dir], rescore=True) == donor.path
        # held back until the record is recomputed from the copy: not done yet
        assert target.read_done() is None and not (target.path / "RUNNING.json").exists()
        held = pending_rescore(target, DIGEST)
        assert StageRecord.from_done(held).to_json() == record
        assert held["reused_from"] == str(donor.path)
        assert pending_rescore(target, "another hash") is None


def test_a_donor_record_with_values_is_not_copied_for_a_stage_that_cannot_recompute_it(
    tmp_path, caplog
):
    """A plausible forged score (0.99) on a stage without Stage.rescore: never taken on faith."""
    donor = _donor(tmp_path, results=_forged({"miou": 0.99}))
    target = _target(tmp_path)
    with caplog.at_level("WARNING", logger="src.pipeline.reuse"):
        assert reuse_stage(target, DIGEST, [donor.run_dir]) is None
    assert target.read_done() is None and not (target.path / "cams").exists()
    assert "cannot recompute" in caplog.text and str(donor.done_file) in caplog.text


def test_a_rescored_copy_is_done_with_the_recomputed_record_only(tmp_path):
    donor = _donor(
        tmp_path,
        results=_forged({"miou": 0.99}, prefix="seg_crf"),
        metrics={"miou": 0.99, "steps": 3},
    )
    target = _target(tmp_path)
    assert reuse_stage(target, DIGEST, [donor.run_dir], rescore=True) == donor.path
    row = StageRecord("seg_crf", {"miou": 0.31}, False)
    finish_rescore(target, pending_rescore(target, DIGEST), row, {"miou": 0.31})
    done = target.read_done()
    assert StageRecord.from_done(done) == row and done["metrics"] == {"miou": 0.31, "steps": 3}
    assert done["reused_from"] == str(donor.path) and pending_rescore(target, DIGEST) is None
    assert not (target.path / reuse.REUSED_FILE).exists()


def test_a_donor_s_markers_are_not_copied(tmp_path):
    """A RUNNING.json the donor kept (killed before removing it) would make a copy that is not
    done look like an interrupted attempt to resume in place, through the hard links."""
    donor = _donor(tmp_path)
    (donor.path / "RUNNING.json").write_text(json.dumps({"config_hash": DIGEST}))
    (donor.path / reuse.REUSED_FILE).write_text("{}")
    target = _target(tmp_path)
    assert reuse_stage(target, DIGEST, [donor.run_dir]) == donor.path
    assert sorted(p.name for p in target.path.iterdir()) == ["DONE.json", "cams"]


def test_the_own_run_is_never_a_donor(tmp_path):
    donor = _donor(tmp_path)
    assert reuse_stage(donor, DIGEST, [donor.run_dir]) is None


def test_a_copy_replaces_the_unfinished_attempt(tmp_path):
    donor, target = _donor(tmp_path), _target(tmp_path)
    assert reuse_stage(target, DIGEST, [donor.run_dir]) == donor.path
    assert not (target.path / "RUNNING.json").exists()
    assert (target.path / "cams" / "a.npz").read_bytes() == b"cam"
    done = target.read_done()
    assert done["config_hash"] == DIGEST and done["reused_from"] == str(donor.path)
    assert StageRecord.from_done(done) == StageRecord("make_cams", {}, False)


def test_an_interrupted_copy_leaves_nothing_that_counts_as_done(tmp_path, monkeypatch):
    donor, target = _donor(tmp_path), _target(tmp_path)

    def killed(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(reuse, "_link_or_copy", killed)
    assert reuse_stage(target, DIGEST, [donor.run_dir]) is None
    assert target.read_done() is None and (target.path / "RUNNING.json").exists()
    assert not list(target.path.parent.glob(f"{REUSE_PREFIX}*"))


def test_a_donor_redone_during_the_copy_is_not_used(tmp_path, monkeypatch):
    donor, target = _donor(tmp_path), _target(tmp_path)

    def copy_while_donor_is_reset(src, dst):
        shutil.copy2(src, dst)
        donor.done_file.write_text(json.dumps({"config_hash": "new", "results": RECORD}))

    monkeypatch.setattr(reuse, "_link_or_copy", copy_while_donor_is_reset)
    assert reuse_stage(target, DIGEST, [donor.run_dir]) is None
    assert target.read_done() is None


def test_a_leftover_copy_of_a_killed_run_is_removed(tmp_path):
    donor, target = _donor(tmp_path), _target(tmp_path)
    stale = target.path.parent / f"{REUSE_PREFIX}make_cams-xyz"
    (stale / "stage").mkdir(parents=True)
    reuse_stage(target, DIGEST, [donor.run_dir])
    assert not stale.exists()


def test_a_run_without_reuse_removes_the_copies_a_kill_left(tiny_cfg, tmp_path, monkeypatch):
    """A reuse copy killed mid-way (SIGKILL skips _copy_stage's cleanup) is removed when the next
    run starts, reuse_from=[] included; nothing it linked to outside is touched."""
    run_dir = Path(tiny_cfg.paths.run_dir)
    killed = run_dir / "round_0" / f"{REUSE_PREFIX}make_cams-k1ll3d" / "stage" / "cams"
    killed.mkdir(parents=True)
    (killed / "a.npz").write_bytes(b"cam" * 1000)
    other_round = run_dir / "round_1" / f"{REUSE_PREFIX}train_cam-x"
    other_round.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (run_dir / "round_0" / f"{REUSE_PREFIX}eval_cams-link").symlink_to(outside)
    with open_dict(tiny_cfg):
        tiny_cfg.reuse_from = []

    class Stop(Exception):
        pass

    def stop(cfg, run_dir):
        raise Stop  # the run has started: the stages would come next

    monkeypatch.setattr(driver, "check_before_work", lambda cfg: None)
    monkeypatch.setattr(driver, "_data_fingerprints", stop)
    with pytest.raises(Stop):
        driver.run_pipeline(tiny_cfg)
    assert not list(run_dir.glob(f"round_*/{REUSE_PREFIX}*"))
    assert (outside / "keep").read_text() == "mine"


# -- what a donor folder may hold: regular files inside it, nothing followed out -----------------
def _outside(tmp_path) -> Path:
    folder = tmp_path / "system"
    folder.mkdir()
    (folder / "passwd").write_text("root:x:0:0\n")
    return folder


def _refused(tmp_path, donor, caplog, problem):
    target = _target(tmp_path)
    with caplog.at_level("WARNING", logger="src.pipeline.reuse"):
        assert reuse_stage(target, DIGEST, [donor.run_dir]) is None
    assert target.read_done() is None and not list(target.path.parent.glob(f"{REUSE_PREFIX}*"))
    assert re.search(problem, caplog.text), caplog.text


def test_a_file_link_out_of_the_donor_is_not_carried_over(tmp_path, caplog):
    system, donor = _outside(tmp_path), _donor(tmp_path)
    (donor.path / "cams" / "b.npz").symlink_to(system / "passwd")
    _refused(tmp_path, donor, caplog, r"cams/b.npz is a link out of the stage folder")
    assert (system / "passwd").stat().st_nlink == 1  # no hard link to it was made


def test_a_folder_link_out_of_the_donor_is_not_followed(tmp_path, caplog):
    system, donor = _outside(tmp_path), _donor(tmp_path)
    (donor.path / "ssl").symlink_to(system, target_is_directory=True)
    _refused(tmp_path, donor, caplog, r"ssl is a link out of the stage folder")
    assert (system / "passwd").stat().st_nlink == 1


def test_a_donor_stage_folder_that_is_a_link_is_not_used(tmp_path, caplog):
    elsewhere = _donor(tmp_path / "elsewhere")
    donor = StageDir(tmp_path / "donor", 0, "make_cams")
    donor.path.parent.mkdir(parents=True)
    donor.path.symlink_to(elsewhere.path, target_is_directory=True)
    _refused(tmp_path, donor, caplog, r"is a link or no folder")
    assert (elsewhere.path / "cams" / "a.npz").stat().st_nlink == 1


def test_a_fifo_in_the_donor_is_refused_not_read(tmp_path, caplog):
    donor = _donor(tmp_path)
    os.mkfifo(donor.path / "cams" / "b.npz")
    _refused(tmp_path, donor, caplog, r"cams/b.npz is not a regular file")


def test_a_link_inside_the_donor_is_left_out_and_the_rest_copied(tmp_path):
    donor, target = _donor(tmp_path), _target(tmp_path)
    wandb = donor.path / "logs" / "wandb"
    (wandb / "run-1").mkdir(parents=True)
    (wandb / "run-1" / "log.txt").write_text("x")
    (wandb / "latest-run").symlink_to("run-1", target_is_directory=True)
    assert reuse_stage(target, DIGEST, [donor.run_dir]) == donor.path
    copied = target.path / "logs" / "wandb"
    assert (copied / "run-1" / "log.txt").read_text() == "x"
    assert not (copied / "latest-run").exists() and not (copied / "latest-run").is_symlink()
    assert (target.path / "cams" / "a.npz").read_bytes() == b"cam"


def test_a_copy_across_file_systems_must_fit_the_free_space(tmp_path, monkeypatch, caplog):
    """A sparse donor file is written out in full across file systems: 1 GiB of holes here,
    with 512 MiB free."""
    donor = _donor(tmp_path)
    with open(donor.path / "cams" / "sparse.npz", "wb") as f:
        f.truncate(1 << 30)
    monkeypatch.setattr(reuse, "_same_file_system", lambda a, b: False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 29))
    copied = []
    monkeypatch.setattr(reuse, "_link_or_copy", lambda src, dst: copied.append(src))
    _refused(tmp_path, donor, caplog, r"files hold \d+ bytes .*more than the 536870912 free")
    assert not copied
