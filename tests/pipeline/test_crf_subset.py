"""`segmenter.crf_images`: the CRF refined and scored on a fixed subset of the val images (the
COCO budget), stated in the results next to the segmenter on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.datamodules import build_dataset
from src.datamodules.palette import read_label_png
from src.evaluation.metrics import SegmentationMetric
from src.pipeline.stages.segmenter import crf_subset
from src.train import train
from tests.pipeline.conftest import copy_run

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


def test_the_subset_spreads_evenly_and_is_checked():
    assert crf_subset(8, None) == list(range(8))
    assert crf_subset(8, 3) == [0, 2, 5]
    assert crf_subset(40504, 5000)[:3] == [0, 8, 16] and len(crf_subset(40504, 5000)) == 5000
    assert crf_subset(8, 20) == list(range(8))
    for bad in (0, -3, "5", True, 2.5):
        with pytest.raises(ValueError, match="segmenter.crf_images"):
            crf_subset(8, bad)


def test_a_subset_redoes_crf_segmenter_on_those_images_and_says_so(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    with open_dict(cfg):
        cfg.round = 0
        cfg.segmenter.crf_images = 3
    row = train(cfg)["rounds"]["0"]
    assert (row["seg_crf_images"], row["seg_crf_split_images"]) == (3, 8)
    rdir = Path(cfg.paths.run_dir) / "round_0"
    dataset = build_dataset(cfg.data, cfg.data.val_split)
    picked = [dataset.ids[i] for i in (0, 2, 5)]
    assert sorted(p.stem for p in (rdir / "crf_segmenter/masks").glob("*.png")) == sorted(picked)
    # The segmenter without the CRF, scored by hand on the same three images.
    metric = SegmentationMetric(cfg.data.num_classes)
    for i, image_id in zip((0, 2, 5), picked, strict=True):
        pred = read_label_png(rdir / "predict_segmenter/masks" / f"{image_id}.png")
        metric.update(np.where(pred == 255, 0, pred), dataset.load_mask(i))
    assert row["seg_crf_without_crf_miou"] == pytest.approx(metric.compute()["miou"], abs=1e-12)
    done = json.loads((rdir / "crf_segmenter/DONE.json").read_text())
    assert done["metrics"]["resume"] == {"computed": 3, "reused": 0}
    table = (Path(cfg.paths.run_dir) / "results.md").read_text()
    assert "(on 3 of 8; no CRF: " in table
