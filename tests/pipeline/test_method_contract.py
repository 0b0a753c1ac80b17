"""What the rest of the pipeline relies on from every method, checked on a tiny run of each.

A method brings its own classifier and pseudo-mask stages; the shared stages (CAM and pseudo-mask
scoring, the segmenter, CONTA) read their outputs by role. So each method's run must give:
* role `cams`: one npz per training image with `keys` (1-based foreground class ids present),
  `cam` (len(keys), ceil(H/4), ceil(W/4)) at stride 4 and `high_res` (len(keys), H, W), in [0, 1];
* role `pseudo_masks`: one palette PNG per training image, H x W, values in the class ids or
  255 (unsure), and no class the image is not labelled with;
* results.json: the run's data / method / conta and the CAM / pseudo-mask / segmenter scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.datamodules import build_dataset
from src.pipeline.driver import check_stages
from src.pipeline.stages.cam import load_cam
from src.train import train
from tests.conftest import CONF_DIR, TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

# Every method config, so a new method keeps the contract without an edit here (with its CPU
# recipe's settings where it has no tiny file).
METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


@pytest.fixture(scope="module", params=METHODS)
def method_run(request, tmp_path_factory):
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    overrides = [
        "experiment=synth",
        "conta=off",
        f"method={method}",
        TINY,  # with the method's conf/debug_method/<method>_tiny.yaml
    ]
    cfg = compose_cfg(overrides, tmp)
    return method, cfg, train(cfg)


def _stage_dir(cfg, role: str):
    plan = check_stages(cfg)
    return (
        plan,
        f"{cfg.paths.output_dir}/{cfg.experiment_name}/seed_0/round_0/{plan.producers[role]}",
    )


def test_cams_keep_the_contract(method_run):
    method, cfg, _ = method_run
    _, folder = _stage_dir(cfg, "cams")
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    for i, image_id in enumerate(dataset.ids):
        with np.load(f"{folder}/cams/{image_id}.npz", allow_pickle=False) as f:
            assert {f["cam"].dtype, f["high_res"].dtype} <= {np.dtype("uint8"), np.dtype("float16")}
        stored = load_cam(Path(folder) / "cams", image_id)  # what every reader gets
        keys, cam, high = stored["keys"], stored["cam"], stored["high_res"]
        labels = np.flatnonzero(dataset.labels[i]) + 1
        assert sorted(keys.tolist()) == sorted(labels.tolist()), (method, image_id)
        h, w = dataset.load_mask(i).shape
        assert cam.shape == (len(keys), math.ceil(h / 4), math.ceil(w / 4)), method
        assert high.shape == (len(keys), h, w), method
        for array in (cam, high):
            assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1 + 1e-3


def test_pseudo_masks_keep_the_contract(method_run):
    method, cfg, _ = method_run
    _, folder = _stage_dir(cfg, "pseudo_masks")
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    for i, image_id in enumerate(dataset.ids):
        with Image.open(f"{folder}/masks/{image_id}.png") as img:
            assert img.mode == "P", (method, image_id)
            mask = np.array(img)
        assert mask.shape == dataset.load_mask(i).shape
        allowed = {0, 255, *(np.flatnonzero(dataset.labels[i]) + 1).tolist()}
        assert set(np.unique(mask).tolist()) <= allowed, (method, image_id)


def test_results_name_the_run_and_score_every_stage(method_run):
    method, cfg, results = method_run
    saved = json.loads(Path(cfg.paths.run_dir, "results.json").read_text())
    assert (saved["data"], saved["method"], saved["conta"]) == ("synth", method, False)
    row = results["rounds"]["0"]
    for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
        assert 0 <= row[key] <= 1, (method, key)
