"""Shared fixtures: configs composed with Hydra's compose API, pointed at tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Every stage in seconds on a 24-image synthetic set: conf/debug/tiny.yaml (+ the method's
# conf/debug_method/<method>_tiny.yaml), the same settings as `python train.py debug=tiny`.
TINY = "debug=tiny"
# Where a tiny run started as a subprocess writes, under its PROJECT_ROOT.
TINY_OUTPUTS = "outputs/tiny"


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
    cfg = compose_cfg(["experiment=synth", "conta=off", TINY], tmp_path)
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


def tiny_cam_sweep(root: Path, seeds: str, *launcher: str) -> subprocess.CompletedProcess:
    """`python train.py -m experiment=synth method=cam conta=off debug=tiny seed=<seeds>` with
    outputs under `root`; its sweep folder is `root / TINY_OUTPUTS / "multirun/synth"`."""
    cmd = [sys.executable, "train.py", "-m", "experiment=synth", "method=cam", "conta=off", TINY]
    env = {**os.environ, "PROJECT_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, f"seed={seeds}", *launcher],
        cwd=Path(CONF_DIR).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def report_table(sweep: Path, out: Path) -> str:
    """`python report.py <sweep> --out <out>` must succeed; returns its table2.md."""
    rep = subprocess.run(
        [sys.executable, "report.py", str(sweep), "--out", str(out)],
        cwd=Path(CONF_DIR).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    return (out / "table2.md").read_text()
