"""The headline recipe runs: `experiment=voc_conta debug=preflight`, rounds 0 and 1, at paper
shapes (ResNet-50 classifier at 512 crops and four CAM scales with flips, IRNet's CRFs and walk,
DeepLab-v2 ResNet-101 with MSC, CONTA's confounders) on a generated VOC 2012 + SBD folder of
500 x 375 / 375 x 500 images, random init, on the CPU. `make preflight` runs every paper
experiment this way (2 images a split); this test keeps the headline one in CI
(`make test-integration`, 1 image a split) so a paper-recipe regression cannot land (d04b298
stopped in its first stage)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from src.datamodules.layouts import write_voc
from src.pipeline.preflight import REPORT_FILE
from src.train import train
from tests.conftest import compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

VOC_SIZES = "preflight.split_sizes={train_aug:10582,train:1464,val:1449}"


@pytest.fixture(scope="module")
def voc_conta_preflight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    root = write_voc(tmp / "VOC2012", train_aug=2, train=2, val=2)
    cfg = compose_cfg(
        [
            "experiment=voc_conta",
            "debug=preflight",
            "preflight.images=1",  # every code path at paper shapes; the steps stay 2
            "trainer=cpu",
            "pretrained=false",
            f"data.root={root}",
            f"data.cache_dir={tmp}/cache",
            "num_workers=0",
            "callbacks.rich_progress_bar=null",
            VOC_SIZES,
        ],
        tmp,
    )
    results = train(cfg)
    return cfg, results


def test_every_stage_of_rounds_0_and_1_finishes_with_finite_results(voc_conta_preflight):
    cfg, results = voc_conta_preflight
    run = Path(cfg.paths.run_dir)
    assert run.parent.parent.name == "preflight"  # never the real run's folder
    for round_idx in (0, 1):
        for stage in cfg.stages:
            done = json.loads((run / f"round_{round_idx}" / stage / "DONE.json").read_text())
            for name in done["artifacts"]:
                assert (run / f"round_{round_idx}" / stage / name).exists(), (stage, name)
            finite = [v for v in done["metrics"].values() if isinstance(v, float)]
            assert all(math.isfinite(v) for v in finite), (round_idx, stage, done["metrics"])
    for row in results["rounds"].values():
        for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
            assert math.isfinite(row[key]), (key, row)


def test_the_paper_shapes_ran(voc_conta_preflight):
    cfg, _ = voc_conta_preflight
    assert cfg.cam.crop_size == 512 and list(cfg.cam.inference.scales) == [1.0, 0.5, 1.5, 2.0]
    assert cfg.segmenter.backbone.arch == "resnet101" and len(cfg.segmenter.module.scales) == 3
    run = Path(cfg.paths.run_dir)
    done = json.loads((run / "round_0" / "train_segmenter" / "DONE.json").read_text())
    assert done["metrics"]["optimizer_steps"] == 2 and done["metrics"]["global_batch_size"] == 1


def test_the_report_projects_the_full_run(voc_conta_preflight):
    cfg, _ = voc_conta_preflight
    run = Path(cfg.paths.run_dir)
    report = json.loads((run / "preflight.json").read_text())
    assert report["split_sizes"]["full"] == {"train_aug": 10582, "train": 1464, "val": 1449}
    proj = report["projection"]
    assert proj["rounds"] == 4  # T = 3: the projection covers the full recipe, not the preflight
    assert set(proj["hours"]) == set(cfg.stages) and proj["total_hours"] > 0
    # Training images: DeepLab's 20,000 steps of 10 per round; the classifier's 5 epochs.
    rows = {(r["round"], r["stage"]): r for r in report["stages"]}
    segmenter = rows[0, "train_segmenter"]
    expected = 20000 * 10 * (rows[0, "train_segmenter"]["seconds_per_image"])
    expected += 20000 * 10 * 3 * rows[1, "train_segmenter"]["seconds_per_image"]
    assert proj["hours"]["train_segmenter"] == pytest.approx(expected / 3600)
    assert segmenter["peak_rss_mb"] > 0 and rows[0, "make_cams"]["bytes_per_image"] > 0
    assert "Projected full run" in (run / REPORT_FILE).read_text()
