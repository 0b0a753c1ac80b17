"""method=cam, the CAM-only baseline (src/methods/cam.py): its pseudo-masks are the CAMs at the
CAM threshold, so on the synthetic set (eval_split = train_split) they score exactly the CAM
mIoU at that threshold, and the threshold is the one setting that redoes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.datamodules import build_dataset
from src.datamodules.palette import read_label_png
from src.evaluation.cam import cam_to_label
from src.pipeline.driver import check_stages
from src.pipeline.hashing import plan_digests
from src.pipeline.stages.cam import load_cam
from src.train import train
from tests.conftest import TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

UP_TO_PSEUDO = "stages=[train_cam,make_cams,eval_cams,make_cam_masks,eval_pseudo]"


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cam")
    cfg = compose_cfg(["experiment=synth", "method=cam", "conta=off", UP_TO_PSEUDO, TINY], tmp)
    return cfg, train(cfg)


def test_pseudo_masks_are_the_cams_at_the_cam_threshold(cam_run):
    cfg, _ = cam_run
    round_dir = Path(cfg.paths.run_dir) / "round_0"
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    assert cfg.data.eval_split == cfg.data.train_split
    for image_id in dataset.ids:
        cam = load_cam(round_dir / "make_cams" / "cams", image_id)
        expected = cam_to_label(cam["high_res"], cam["keys"], cfg.cam.eval.bg_threshold)
        mask = read_label_png(round_dir / "make_cam_masks" / "masks" / f"{image_id}.png")
        np.testing.assert_array_equal(mask, expected, err_msg=image_id)


def test_its_pseudo_mask_score_is_the_cam_score_at_the_threshold(cam_run):
    _, results = cam_run
    row = results["rounds"]["0"]
    assert row["cam_threshold"] == 0.15
    assert row["pseudo_miou"] == pytest.approx(row["cam_miou"], abs=1e-9)
    assert "pseudo_ir_label_miou" not in row  # no affinity labels to score beside them


def test_only_the_cam_threshold_redoes_its_pseudo_masks():
    cfg = compose_cfg(["method=cam", "conta=off"])
    before = plan_digests(cfg, check_stages(cfg))
    with open_dict(cfg):
        cfg.cam.eval.bg_threshold = 0.3
    after = plan_digests(cfg, check_stages(cfg))
    changed = {name for (_, name), digest in after.items() if before[(0, name)] != digest}
    # The masks and everything trained or scored on them; the classifier and its CAMs stay.
    assert changed == {
        "eval_cams",
        "make_cam_masks",
        "eval_pseudo",
        "train_segmenter",
        "predict_segmenter",
        "eval_segmenter",
        "crf_segmenter",
    }
