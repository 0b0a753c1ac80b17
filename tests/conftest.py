"""Shared fixtures: configs composed with Hydra's compose API, pointed at tmp dirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A synthetic set small enough for end-to-end tests on 2 cores.
TINY_SYNTH = [
    "data.generator.num_train=24",
    "data.generator.num_val=8",
    "data.generator.image_size=64",
]
# A classifier schedule that finishes in seconds.
FAST_CAM = [
    "cam.max_epochs=1",
    "cam.crop_size=64",
    "cam.batch_size=8",
    "cam.inference.scales=[1.0,0.5]",
    "cam.inference.batch_size=8",
    "num_workers=0",
    "callbacks.rich_progress_bar=null",
    "figure_images=2",
]
FAST_AFFINITY = [
    "affinity.max_epochs=1",
    "affinity.crop_size=96",  # the stride-4 grid must exceed twice the pair radius (10)
    "affinity.batch_size=8",
    "affinity.inference_batch_size=8",
    "affinity.ir_label.workers=1",
    "affinity.module.exp_times=4",
]
FAST_SEGMENTER = [
    "segmenter.max_steps=4",
    "segmenter.batch_size=8",
    "segmenter.crop_size=64",
    "segmenter.inference.batch_size=8",
    "segmenter.val_every_n_epochs=1",
    "segmenter.crf_workers=1",
    "conta.size=[8,8]",  # the tiny set's 64 px images at output stride 8
]
FAST = [*TINY_SYNTH, *FAST_CAM, *FAST_AFFINITY, *FAST_SEGMENTER]


def compose_cfg(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("train", overrides=overrides)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "outputs")
            cfg.paths.data_dir = str(tmp_path / "data")
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """One generated tiny synthetic set for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_cfg(tmp_path, shared_data_dir) -> DictConfig:
    cfg = compose_cfg(
        ["experiment=synth", "conta=off", *TINY_SYNTH, *FAST_CAM, *FAST_AFFINITY], tmp_path
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(shared_data_dir)
    return cfg


def predict_cli(*overrides: str) -> subprocess.CompletedProcess:
    """`python predict.py <overrides> device=cpu` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "predict.py", *overrides, "device=cpu"],
        cwd=Path(CONF_DIR).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
