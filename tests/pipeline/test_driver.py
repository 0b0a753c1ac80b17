"""The round driver end to end on a tiny synthetic set: artifacts, DONE markers, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.pipeline import driver
from src.pipeline.artifacts import StageDir
from src.pipeline.stage import Stage
from src.pipeline.stages import STAGES
from src.pipeline.stages.cam import MissingArtifactError
from src.train import train

ALL = [
    "train_cam",
    "make_cams",
    "eval_cams",
    "make_ir_labels",
    "train_affinity",
    "make_pseudo_masks",
    "eval_pseudo",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete tiny synth_irnet run; tests copy it before changing anything."""
    from tests.conftest import FAST_AFFINITY, FAST_CAM, TINY_SYNTH, compose_cfg

    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(["experiment=synth_irnet", *TINY_SYNTH, *FAST_CAM, *FAST_AFFINITY], tmp)
    results = train(cfg)
    return cfg, results


def copy_run(finished_run, tmp_path):
    cfg, _ = finished_run
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run[0].paths.run_dir, cfg.paths.run_dir)
    return cfg


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
            Stage(
                name,
                boom,
                STAGES[name].config_keys,
                STAGES[name].inputs,
                STAGES[name].rank_zero_only,
            ),
        )
    results = train(cfg)
    assert results["rounds"]["0"]["cam_miou"] == finished_run[1]["rounds"]["0"]["cam_miou"]


def test_changed_setting_redoes_only_the_stages_it_affects(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    before = done_seconds(cfg.paths.run_dir)
    marks = {s: StageDir(Path(cfg.paths.run_dir), 0, s).done_file.stat().st_mtime_ns for s in ALL}
    with open_dict(cfg):
        cfg.affinity.module.bg_threshold = 0.35  # random-walk labelling: make_pseudo_masks onwards
    train(cfg)
    after = {s: StageDir(Path(cfg.paths.run_dir), 0, s).done_file.stat().st_mtime_ns for s in ALL}
    redone = {s for s in ALL if after[s] != marks[s]}
    assert redone == {"make_pseudo_masks", "eval_pseudo"}
    assert before.keys() == after.keys()


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
    arrays["cam"][:] = np.nan
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
