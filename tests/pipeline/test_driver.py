"""The round driver end to end on a tiny synthetic set: artifacts, DONE markers, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.pipeline import driver
from src.pipeline.artifacts import StageDir
from src.pipeline.registry import STAGES
from src.train import train
from src.utils.errors import MissingArtifactError
from tests.pipeline.conftest import ROUND0, copy_run

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ALL = ROUND0


def done_seconds(run_dir) -> dict[str, float]:
    return {
        s: json.loads(StageDir(Path(run_dir), 0, s).done_file.read_text())["seconds"] for s in ALL
    }


def test_every_stage_leaves_its_artifacts_and_done_marker(finished_run):
    cfg, results = finished_run
    run_dir = Path(cfg.paths.run_dir)
    for stage in ALL:
        done = StageDir(run_dir, 0, stage).read_done()
        assert done["stage"] == stage and done["config_hash"]
        for artifact in done["artifacts"]:
            assert (run_dir / "round_0" / stage / artifact).exists()
        assert not (run_dir / "round_0" / stage / driver.RUNNING_FILE).exists()
    n_train = 24
    assert len(list((run_dir / "round_0/make_cams/cams").glob("*.npz"))) == n_train
    assert len(list((run_dir / "round_0/make_ir_labels/ir_labels").glob("*.png"))) == n_train
    assert len(list((run_dir / "round_0/make_pseudo_masks/masks").glob("*.png"))) == n_train
    row = results["rounds"]["0"]
    for key in ("cam_miou", "cam_best_miou", "pseudo_miou", "cam_errors", "pseudo_errors"):
        assert key in row
    assert 0 <= row["cam_miou"] <= 1 and 0 <= row["pseudo_miou"] <= 1
    assert (run_dir / "results.md").read_text().count("|") > 10
    assert (run_dir / "round_0/eval_cams/cams.png").stat().st_size > 1000
    assert list((run_dir / "round_0/train_cam/logs").rglob("metrics.csv"))


def test_rerun_skips_finished_stages(finished_run, tmp_path, monkeypatch):
    cfg = copy_run(finished_run, tmp_path)

    def boom(ctx):
        raise AssertionError(f"{ctx.name} should have been skipped")

    for name in ALL:
        monkeypatch.setitem(
            STAGES,
            name,
            dataclasses.replace(STAGES[name], run=boom),
        )
    results = train(cfg)
    assert results["rounds"]["0"]["cam_miou"] == finished_run[1]["rounds"]["0"]["cam_miou"]


def test_changed_setting_redoes_only_the_stages_it_affects(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    before = done_seconds(cfg.paths.run_dir)
    marks = {s: StageDir(Path(cfg.paths.run_dir), 0, s).done_file.stat().st_mtime_ns for s in ALL}
    with open_dict(cfg):
        cfg.round = 0
        cfg.segmenter.crf.iterations = 5  # CRF post-processing: only its own stage
    train(cfg)
    after = {s: StageDir(Path(cfg.paths.run_dir), 0, s).done_file.stat().st_mtime_ns for s in ALL}
    redone = {s for s in ALL if after[s] != marks[s]}
    assert redone == {"crf_segmenter"}
    assert before.keys() == after.keys()


def test_force_redoes_the_stage_and_everything_that_reads_it(finished_run, tmp_path):
    """A forced stage need not reproduce its old output bit for bit (GPU kernels), so the
    stages that read it are redone too, not mixed with its new output."""
    cfg = copy_run(finished_run, tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    marks = {s: StageDir(run_dir, 0, s).done_file.stat().st_mtime_ns for s in ALL}
    with open_dict(cfg):
        cfg.round = 0
        cfg.force = ["train_affinity"]
    train(cfg)
    redone = {s for s in ALL if StageDir(run_dir, 0, s).done_file.stat().st_mtime_ns != marks[s]}
    assert redone == {
        "train_affinity",
        "make_pseudo_masks",
        "eval_pseudo",
        "train_segmenter",
        "predict_segmenter",
        "eval_segmenter",
        "crf_segmenter",
        "confounders",
    }


def test_crash_while_writing_pseudo_masks_resumes_without_partial_files(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    sdir = StageDir(Path(cfg.paths.run_dir), 0, "make_pseudo_masks")
    masks = sorted((sdir.path / "masks").glob("*.png"))
    reference = {p.name: p.read_bytes() for p in masks}
    # What a kill mid-stage leaves: no DONE, RUNNING kept, some masks absent, a temp file.
    digest = sdir.read_done()["config_hash"]
    sdir.done_file.unlink()
    (sdir.path / driver.RUNNING_FILE).write_text(json.dumps({"config_hash": digest}))
    for p in masks[::3]:
        p.unlink()
    (sdir.path / "masks" / f".{masks[0].name}.abc.tmp").write_bytes(b"half")
    train(cfg)
    now = {p.name: p.read_bytes() for p in (sdir.path / "masks").glob("*.png")}
    assert now == reference
    assert sdir.read_done()["config_hash"] == digest


def test_missing_cam_file_names_the_image(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    cam = sorted((Path(cfg.paths.run_dir) / "round_0/make_cams/cams").glob("*.npz"))[0]
    cam.unlink()
    with open_dict(cfg):
        cfg.force = ["make_ir_labels"]
    with pytest.raises(MissingArtifactError, match=f"image {cam.stem!r} is missing"):
        train(cfg)


def test_nan_cam_is_an_error(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    cam = sorted((Path(cfg.paths.run_dir) / "round_0/make_cams/cams").glob("*.npz"))[0]
    with np.load(cam) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["cam"] = np.full(arrays["cam"].shape, np.nan, np.float32)  # a float CAM file
    np.savez(cam, **arrays)
    with open_dict(cfg):
        cfg.force = ["make_pseudo_masks"]
    with pytest.raises(ValueError, match=f"{cam.stem}.*NaN"):
        train(cfg)


def test_negative_round_is_rejected(tiny_cfg):
    with open_dict(tiny_cfg):
        tiny_cfg.round = -1
    with pytest.raises(driver.PipelineError, match="round=-1"):
        driver.run_pipeline(tiny_cfg)


class _Stop(Exception):
    pass


def test_config_yaml_is_replaced_not_written_through_a_link(tiny_cfg, tmp_path, monkeypatch):
    """A config.yaml that is a symlink (or a hard link shared with another run) is replaced by
    the run's own file; the file it pointed at stays as it was."""
    run_dir = Path(tiny_cfg.paths.run_dir)
    run_dir.mkdir(parents=True)
    outside, shared = tmp_path / "outside.yaml", tmp_path / "shared.yaml"
    outside.write_text("not the run's\n")
    shared.write_text("another run's config\n")
    (run_dir / "config.yaml").symlink_to(outside)
    monkeypatch.setattr(driver, "check_before_work", lambda cfg: None)

    def stop(cfg, run_dir):
        raise _Stop  # the config is written; nothing else is needed

    monkeypatch.setattr(driver, "_data_fingerprints", stop)
    with pytest.raises(_Stop):
        driver.run_pipeline(tiny_cfg)
    config = run_dir / "config.yaml"
    assert not config.is_symlink() and "experiment_name" in config.read_text()
    assert outside.read_text() == "not the run's\n"

    config.unlink()
    config.hardlink_to(shared)
    with pytest.raises(_Stop):
        driver.run_pipeline(tiny_cfg)
    assert shared.read_text() == "another run's config\n"
    assert config.stat().st_nlink == 1
