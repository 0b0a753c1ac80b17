"""CONTA rounds through the driver: confounders, round-1 classifier with M, results per round,
eval.py, and the bad inputs of the round loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.datamodules import build_dataset
from src.evaluate import evaluate
from src.models.context import ConfounderError, Confounders, resize_nearest
from src.pipeline import driver
from src.pipeline.artifacts import StageDir
from src.pipeline.hashing import picked_config, stage_keys
from src.pipeline.registry import STAGES
from src.pipeline.stages.cam import read_weights
from src.train import train
from tests.conftest import TINY, compose_cfg
from tests.pipeline.conftest import copy_run

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


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
    state = torch_load(run_dir / "round_1/train_cam/cam_net.pt")
    hw = int(np.prod(cfg.conta.size))
    assert state["context.w1.weight"].shape == (hw, hw)  # calibrated: identity-initialised
    # M joins layer4's input (128 channels of the tiny ResNet) by default.
    assert state["backbone.stage4.0.conv1.weight"].shape[1] == 128 + 1
    assert state["classifier.weight"].shape[1] == 256
    assert "context.w1.weight" not in torch_load(run_dir / "round_0/train_cam/cam_net.pt")
    assert (run_dir / "round_1/make_cams/context_maps.png").stat().st_size > 1000
    assert (run_dir / "round_0/confounders/confounders.png").is_file()
    assert set(results["rounds"]) == {"0", "1"}
    for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
        assert 0 <= results["rounds"]["1"][key] <= 1
    context = results["rounds"]["1"]["context"]
    assert "context" not in results["rounds"]["0"]
    assert 1 / n_fg <= context["alpha_max"] <= 1 and 0 <= context["alpha_entropy"] <= 1
    assert context["m_spread"] >= 0 and context["m_logit_share"] >= 0
    assert context["images"] == 24
    # The tiny run's 4-step segmenter predicts (almost) only background: M is inert, and says so.
    inert = (
        context["alpha_entropy"] > 0.98
        or context["m_spread"] < 0.01
        or context["m_logit_share"] < 0.01
    )
    assert context["inert"] is inert
    # ... and the same numbers reach the stage's loggers (CSV here; W&B gets the same call).
    logged = next((run_dir / "round_1/train_cam/logs").rglob("metrics.csv")).read_text()
    assert all(f"context/{k}" in logged for k in ("alpha_max", "m_spread", "m_logit_share"))
    assert (run_dir / "rounds.png").is_file()
    text = (run_dir / "results.md").read_text()
    assert "Δ r1−r0" in text and "supervised (synth_supervised)" in text
    assert "## CONTA context map" in text and "alpha_max" in text
    assert results["upper_bound"]["seg_miou"] is not None


def torch_load(path):
    """A stage's weight file, its digest checked (src/utils/weights.py)."""
    return read_weights(Path(path), "train_cam")


def test_rounds_above_zero_need_the_confounders_stage(tmp_path):
    cfg = compose_cfg(["experiment=synth", "conta=off", "round=1", TINY], tmp_path)
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
    # Round 1's classifier is redone (force would redo round 0 first, rewriting the file).
    StageDir(Path(cfg.paths.run_dir), 1, "train_cam").done_file.unlink()
    with pytest.raises(ConfounderError, match="voc"):
        train(cfg)


def test_a_redone_stage_says_which_setting_changed(finished_run, tmp_path, caplog):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.segmenter.crf.iterations = 3
    sdir = StageDir(Path(cfg.paths.run_dir), 0, "crf_segmenter")
    with caplog.at_level(logging.WARNING, logger="src.pipeline.driver"):
        fingerprints = json.loads((sdir.run_dir / driver.FINGERPRINTS_FILE).read_text())
        keys = stage_keys(STAGES["crf_segmenter"], 0)
        driver._explain_redo(sdir, picked_config(cfg, keys, fingerprints))
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


def test_eval_redoes_its_predictions_after_the_run_was_retrained(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.split, cfg.crf = "train", False
    first = evaluate(cfg)
    out = Path(cfg.paths.run_dir) / "eval/round_1_train/predict_segmenter/masks"
    stale = sorted(out.glob("*.png"))[0]
    fresh = stale.read_bytes()
    stale.write_bytes(b"from the weights before the retrain")
    # What a retrain of the segmenter leaves: the same folders, another hash in DONE.json.
    done = StageDir(Path(cfg.paths.run_dir), 1, "train_segmenter")
    record = done.read_done()
    record["config_hash"] = "0" * 16
    done.done_file.write_text(json.dumps(record))
    again = evaluate(cfg)
    assert stale.read_bytes() == fresh
    assert again["seg"]["miou"] == first["seg"]["miou"]


def test_eval_of_an_unfinished_round_says_what_to_run(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.round, cfg.split, cfg.crf = 2, None, False
    with pytest.raises(FileNotFoundError, match="round 2.*train.py"):
        evaluate(cfg)


def test_round_one_with_m_forced_to_zero_reproduces_round_zero(finished_run, tmp_path):
    """Common random numbers: every stage draws the same seed in every round and the CONTA
    parameters draw from their own generator, so with a zero M channel (conta.ablate=zero_m)
    round 1 is round 0 again: CAMs, pseudo-masks and segmenter metrics."""
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.conta.ablate = "zero_m"
    results = train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    r0, r1 = run_dir / "round_0", run_dir / "round_1"
    cams = sorted((r0 / "make_cams/cams").glob("*.npz"))
    assert len(cams) == 24
    for path in cams:
        with np.load(path) as a, np.load(r1 / "make_cams/cams" / path.name) as b:
            np.testing.assert_array_equal(a["keys"], b["keys"])
            for key in ("cam", "high_res"):
                np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0)
    masks = sorted((r0 / "make_pseudo_masks").rglob("*.png"))
    assert len(masks) >= 24
    for path in masks:
        other = r1 / path.relative_to(r0)
        assert path.read_bytes() == other.read_bytes(), path.name
    rows = results["rounds"]
    for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
        assert rows["1"][key] == pytest.approx(rows["0"][key], abs=1e-6), key
    assert rows["1"]["context"]["m_logit_share"] == 0.0  # and M reached nothing


def test_a_different_m_changes_round_one(finished_run):
    """The converse: with the live M the round-1 classifier is not round 0's."""
    cfg, _ = finished_run
    run_dir = Path(cfg.paths.run_dir)
    a = torch_load(run_dir / "round_0/train_cam/cam_net.pt")
    b = torch_load(run_dir / "round_1/train_cam/cam_net.pt")
    assert not np.allclose(a["classifier.weight"].numpy(), b["classifier.weight"].numpy())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("conta.context=dot", r"conta.context='dot'.*calibrated"),
        ("conta.c_source=segmenter", r"conta.c_source='segmenter'.*pred"),
        ("conta.m_source=random", r"conta.m_source='random'.*shuffled"),
        ("conta.ablate=zero", r"conta.ablate='zero'.*zero_m"),
        ("conta.c_source=shuffled", r"conta.c_source='shuffled'.*mean"),
        ("conta.attention=uniform", r"conta.attention='uniform'.*prior"),
    ],
)
def test_unknown_conta_switches_are_refused_before_any_stage(tmp_path, override, match):
    cfg = compose_cfg(["experiment=synth_conta", override, TINY], tmp_path)
    with pytest.raises(ValueError, match=match):
        driver.run_pipeline(cfg)
    assert not (Path(cfg.paths.run_dir) / "round_0").exists()


def test_gt_confounders_need_a_split_with_masks(tmp_path):
    cfg = compose_cfg(["experiment=synth_conta", "conta.c_source=gt", TINY], tmp_path)
    with open_dict(cfg):
        cfg.data.splits.train.masks = None
    with pytest.raises(ValueError, match=r"c_source=gt.*'train'.*data.splits.train.masks"):
        driver.run_pipeline(cfg)


def test_gt_and_shuffled_confounders(finished_run, tmp_path):
    """c_source=gt: C is the ground truth's class-average mask; m_source=shuffled: the same C,
    every image another image's m. Only the confounders (and round 1) are redone."""
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.conta.c_source, cfg.round = "gt", 0
    train(cfg)
    path = Path(cfg.paths.run_dir) / "round_0/confounders"
    gt = Confounders.load(path, expected_dataset="synth", expected_num_classes=6)
    assert gt.c_source == "gt" and gt.m_source == "own"
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    mask = resize_nearest(dataset.load_mask(0), cfg.conta.size)
    np.testing.assert_array_equal(gt.mask_for(dataset.ids[0]), ((mask > 0) & (mask < 255)))
    with open_dict(cfg):
        cfg.conta.m_source = "shuffled"
    train(cfg)
    shuffled = Confounders.load(path, expected_dataset="synth", expected_num_classes=6)
    np.testing.assert_array_equal(shuffled.centers, gt.centers)
    assert shuffled.m_source == "shuffled"
    moved = [not np.array_equal(shuffled.mask_for(i), gt.mask_for(i)) for i in dataset.ids]
    assert np.mean(moved) > 0.5  # a derangement (two images may share an identical m)
    with open_dict(cfg):  # c_source=mean: the prediction's C, every c_i its mean, own m
        cfg.conta.c_source, cfg.conta.m_source = "mean", "own"
    train(cfg)
    mean = Confounders.load(path, expected_dataset="synth", expected_num_classes=6)
    assert mean.c_source == "mean" and mean.m_source == "own"
    pred = Confounders.load(
        Path(finished_run[0].paths.run_dir) / "round_0/confounders",
        expected_dataset="synth",
        expected_num_classes=6,
    )
    present = pred.counts > 0
    for center in mean.centers:
        np.testing.assert_allclose(center, pred.centers[present].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(mean.codes, pred.codes)
