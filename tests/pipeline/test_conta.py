"""CONTA rounds through the driver: confounders, round-1 classifier with M, results per round,
eval.py, and the bad inputs of the round loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.evaluate import evaluate
from src.models.context import ConfounderError
from src.pipeline import driver
from src.pipeline.artifacts import StageDir
from src.pipeline.runtime import picked_config
from src.train import train
from tests.conftest import FAST, compose_cfg
from tests.pipeline.conftest import copy_run


def test_round_one_trains_the_classifier_with_the_round_zero_confounders(finished_run):
    cfg, results = finished_run
    run_dir = Path(cfg.paths.run_dir)
    conf = np.load(run_dir / "round_0/confounders/confounders.npz")
    n_fg = cfg.data.num_classes - 1
    assert conf["centers"].shape == (n_fg, *cfg.conta.size)
    assert np.isfinite(conf["centers"]).all() and conf["centers"].max() <= 1
    np.testing.assert_allclose(conf["prior"], np.full(n_fg, 1 / n_fg), rtol=1e-6)
    # m for every train image (C) and every val image (the classifier's validation).
    assert len(conf["ids"]) == 24 + 8
    state = __import__("torch").load(run_dir / "round_1/train_cam/cam_net.pt", weights_only=True)
    assert state["context.w1.weight"].shape == (n_fg, int(np.prod(cfg.conta.size)))
    assert state["classifier.weight"].shape[1] == 256 + 1  # tiny ResNet features + M
    assert "context.w1.weight" not in torch_load(run_dir / "round_0/train_cam/cam_net.pt")
    assert (run_dir / "round_1/make_cams/context_maps.png").stat().st_size > 1000
    assert (run_dir / "round_0/confounders/confounders.png").is_file()
    assert set(results["rounds"]) == {"0", "1"}
    for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
        assert 0 <= results["rounds"]["1"][key] <= 1
    assert (run_dir / "rounds.png").is_file()
    text = (run_dir / "results.md").read_text()
    assert "Δ r1−r0" in text and "supervised (synth_supervised)" in text
    assert results["upper_bound"]["seg_miou"] is not None


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


def test_rounds_above_zero_need_the_confounders_stage(tmp_path):
    cfg = compose_cfg(["experiment=synth_irnet", "round=1", *FAST], tmp_path)
    with pytest.raises(driver.PipelineError, match="confounders.*synth_conta"):
        driver.run_pipeline(cfg)


def test_confounders_of_another_data_set_are_refused(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    path = Path(cfg.paths.run_dir) / "round_0/confounders/confounders.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["dataset"] = "voc"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with open_dict(cfg):
        cfg.force = ["train_cam"]
    with pytest.raises(ConfounderError, match="voc"):
        train(cfg)


def test_a_redone_stage_says_which_setting_changed(finished_run, tmp_path, caplog):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.segmenter.crf.iterations = 3
    sdir = StageDir(Path(cfg.paths.run_dir), 0, "crf_segmenter")
    with caplog.at_level(logging.WARNING, logger="src.pipeline.driver"):
        driver._explain_redo(sdir, picked_config(cfg, ["data.val_split", "segmenter.crf"]))
    assert "config changed: ['segmenter.crf']" in caplog.text


def test_a_changed_conta_setting_redoes_the_rounds_it_affects(finished_run, tmp_path):
    """The prior shapes round 0's confounders and everything of round 1; round 0's other stages
    stay (the plain baseline is shared by every CONTA variant)."""
    cfg = copy_run(finished_run, tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("round_*/*/DONE.json")}
    with open_dict(cfg):
        cfg.conta.prior = "empirical"
    train(cfg)
    redone = {
        p.parent.relative_to(run_dir).as_posix()
        for p in before
        if before[p] != p.stat().st_mtime_ns
    }
    assert {s for s in redone if s.startswith("round_0")} == {"round_0/confounders"}
    assert {s for s in redone if s.startswith("round_1")} == {
        p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob("round_1/*/DONE.json")
    }


def test_eval_reproduces_the_run_and_scores_another_split(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    run = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())["rounds"]["1"]
    with open_dict(cfg):
        cfg.split, cfg.crf = None, True
    scored = evaluate(cfg)
    for prefix in ("cam", "pseudo", "seg", "seg_crf"):
        assert scored[prefix]["miou"] == pytest.approx(run[f"{prefix}_miou"], abs=1e-9)
    cfg = copy_run(finished_run, tmp_path / "other")
    with open_dict(cfg):
        cfg.split, cfg.crf = "train", False
    scored = evaluate(cfg)
    assert scored["seg"]["split"] == "train"
    out = Path(cfg.paths.run_dir) / "eval/round_1_train"
    assert len(list((out / "predict_segmenter/masks").glob("*.png"))) == 24
    assert (out / "results.json").is_file()


def test_eval_of_an_unfinished_round_says_what_to_run(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.round, cfg.split, cfg.crf = 2, None, False
    with pytest.raises(FileNotFoundError, match="round 2.*train.py"):
        evaluate(cfg)
