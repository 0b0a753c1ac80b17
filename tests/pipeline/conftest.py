"""One finished tiny CONTA run shared by the pipeline tests (they copy it before changing it)."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import open_dict

from src.train import train
from tests.conftest import TINY, compose_cfg

ROUND0 = [
    "train_cam",
    "make_cams",
    "eval_cams",
    "make_ir_labels",
    "train_affinity",
    "make_pseudo_masks",
    "eval_pseudo",
    "train_segmenter",
    "predict_segmenter",
    "eval_segmenter",
    "crf_segmenter",
    "confounders",
]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny supervised bound, then a complete tiny two-round synth_conta run on the same data;
    tests copy the run before changing anything."""
    tmp = tmp_path_factory.mktemp("run")
    train(compose_cfg(["experiment=synth_supervised", TINY], tmp))
    cfg = compose_cfg(["experiment=synth_conta", "round=1", TINY], tmp)
    results = train(cfg)
    return cfg, results


def copy_run(finished_run, tmp_path):
    cfg, _ = finished_run
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "run")
        cfg.reuse_from = []  # the copy stands alone: the original would donate every stage
    shutil.copytree(finished_run[0].paths.run_dir, cfg.paths.run_dir)
    return cfg
