"""The segmenter's start (backbone from the round's classifier) and its class-balanced loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from src.datamodules.palette import read_label_png
from src.models.deeplab import balanced_class_weights
from src.pipeline.driver import PipelineError, check_stages
from src.pipeline.stages.cam import WEIGHTS_FILE, read_weights
from src.pipeline.stages.pseudo_masks import MASK_DIR
from src.pipeline.stages.segmenter import fresh_segmenter_net
from src.utils.errors import MissingArtifactError

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


def _classifier_backbone(train_cam_dir: Path) -> dict[str, torch.Tensor]:
    state = read_weights(train_cam_dir / WEIGHTS_FILE, "train_cam")
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.parametrize("round_idx", [0, 1])
def test_backbone_init_cam_copies_the_rounds_classifier(finished_run, round_idx):
    cfg, _ = finished_run
    assert cfg.segmenter.backbone_init == "cam"
    train_cam = Path(cfg.paths.run_dir) / f"round_{round_idx}" / "train_cam"
    classifier = _classifier_backbone(train_cam)
    net = fresh_segmenter_net(cfg, train_cam)
    own = net.backbone.state_dict()
    assert own.keys() == classifier.keys()
    for key, value in own.items():
        # Round 1's classifier sees M as one extra input channel of layer4; the segmenter does not.
        expected = classifier[key][:, : value.shape[1]] if value.ndim == 4 else classifier[key]
        assert torch.equal(value, expected), key
    widened = [k for k in own if own[k].shape != classifier[k].shape]
    assert bool(widened) == (round_idx == 1)


def test_backbone_init_pretrained_ignores_the_classifier(finished_run):
    cfg, _ = finished_run
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.segmenter.backbone_init = "pretrained"
    train_cam = Path(cfg.paths.run_dir) / "round_0" / "train_cam"
    net = fresh_segmenter_net(cfg, train_cam)
    classifier = _classifier_backbone(train_cam)
    own = net.backbone.state_dict()
    first = next(k for k, v in own.items() if v.ndim == 4)
    assert not torch.equal(own[first], classifier[first])


def test_backbone_init_errors_name_the_fix(finished_run, tmp_path):
    cfg, _ = finished_run
    with pytest.raises(MissingArtifactError, match="add train_cam"):
        fresh_segmenter_net(cfg, tmp_path)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.stages = ["train_segmenter", "predict_segmenter"]
        cfg.segmenter.labels = "gt"
        cfg.round = 0
    with pytest.raises(PipelineError, match="segmenter.backbone_init=pretrained"):
        check_stages(cfg)
    with open_dict(cfg):
        cfg.segmenter.backbone_init = "imagenet"
    with pytest.raises(ValueError, match="use one of"):
        fresh_segmenter_net(cfg, None)


def test_class_weights_follow_the_training_labels(finished_run):
    cfg, _ = finished_run
    round_dir = Path(cfg.paths.run_dir) / "round_0"
    done = json.loads((round_dir / "train_segmenter" / "DONE.json").read_text())
    assert cfg.segmenter.class_balance == "inverse_sqrt"
    # Recount the pixels of the pseudo-masks the segmenter trained on, from the PNGs.
    counts = np.zeros(cfg.data.num_classes, dtype=np.int64)
    for path in sorted((round_dir / "make_pseudo_masks" / MASK_DIR).glob("*.png")):
        label = read_label_png(path)
        counts += np.bincount(label[label < cfg.data.num_classes], minlength=len(counts))
    assert counts.sum() > 0
    expected = balanced_class_weights(counts, "inverse_sqrt")
    assert done["metrics"]["class_weight"] == pytest.approx(expected.tolist(), abs=1e-4)
    # The commonest class weighs least, the rarest present class most; absent classes weigh 1.
    present = counts > 0
    weights = np.array(done["metrics"]["class_weight"])
    assert weights[counts.argmax()] == weights[present].min()
    assert weights[np.where(present, counts, counts.max() + 1).argmin()] == weights.max()
    assert np.all(weights[~present] == 1.0)
