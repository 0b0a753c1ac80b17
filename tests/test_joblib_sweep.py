"""A sweep under Hydra's joblib launcher (`hydra/launcher=joblib`), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, TINY_OUTPUTS

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 44 s: three jobs on two loky processes
def test_every_job_of_a_joblib_sweep_runs(tmp_path):
    """Three jobs on two loky processes, each with DataLoader workers and a CRF process pool.
    Three faults of the launcher are covered: it restores the resolvers it saw at start-up before
    each job (a process's second job failed on `${with_conta:...}` while `src` was imported only
    inside the first); loky's default start method broke DataLoader workers ('Process' object has
    no attribute 'env') and spawned pool workers (cannot find context for 'loky')."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "experiment=synth",
        "conta=off",
        TINY,
        "stages=[train_cam,make_cams,make_ir_labels]",
        "affinity.ir_label.workers=2",
        "seed=0,1,2",
        "num_workers=1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    for seed in (0, 1, 2):
        labels = tmp_path / TINY_OUTPUTS / f"synth_irnet/seed_{seed}/round_0/make_ir_labels"
        assert json.loads((labels / "DONE.json").read_text())["stage"] == "make_ir_labels"
        assert len(list((labels / "ir_labels").glob("*.png"))) == 24
