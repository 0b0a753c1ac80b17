"""A sweep under Hydra's joblib launcher (`hydra/launcher=joblib`), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST_CAM, TINY_SYNTH

ROOT = Path(__file__).resolve().parents[1]


def test_every_job_of_a_joblib_sweep_runs(tmp_path):
    """The launcher restores the resolvers it snapshot at start-up before each job: a second
    job in one process must still resolve `with_conta` (it did not while `src` was imported only
    inside the first job)."""
    fast = [o for o in FAST_CAM if not o.startswith("num_workers=")]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "experiment=synth_cam",
        *TINY_SYNTH,
        *fast,
        "stages=[train_cam]",
        "seed=0,1",
        "num_workers=1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=1",  # both jobs in one process, one after the other
    ]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for seed in (0, 1):
        run_dir = tmp_path / f"outputs/synth_irnet_cam/seed_{seed}"
        done_file = run_dir / "round_0/train_cam/DONE.json"
        assert json.loads(done_file.read_text())["stage"] == "train_cam"
