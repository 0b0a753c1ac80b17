"""A sweep survives a bad job: under the basic and the joblib launcher, one job failing (its run
folder is taken by a damaged file) leaves the others to finish; the sweep summary lists the
failed job with its error and log, the sweep exits non-zero, and report.py tabulates the finished
runs and lists the missing one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_CAM, FAST_SEGMENTER, TINY_SYNTH

ROOT = Path(__file__).resolve().parents[1]


def _sweep(tmp_path: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    fast = [o for o in FAST_CAM + FAST_SEGMENTER if not o.startswith("conta.size")]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "experiment=synth",
        "method=cam",
        "conta=off",
        *TINY_SYNTH,
        *fast,
        "seed=0,1,2",
        *launcher,
    ]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # 30 s (basic), 40 s (joblib): three tiny method=cam runs
@pytest.mark.parametrize(
    "launcher",
    [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
    ids=["basic", "joblib"],
)
def test_a_failed_job_leaves_the_others_and_is_listed(tmp_path, launcher):
    bad = tmp_path / "outputs" / "synth_cam" / "seed_1"
    bad.parent.mkdir(parents=True)
    bad.write_text("a damaged run folder of seed 1\n")
    done = _sweep(tmp_path, launcher)
    assert done.returncode != 0, "a sweep with a failed job must say so in its exit status"
    assert "1 of 3 jobs failed" in done.stderr, done.stderr[-4000:]

    sweep = tmp_path / "outputs" / "multirun" / "synth"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    status = {next(o for o in j["overrides"] if o.startswith("seed=")): j for j in jobs}
    assert {k: j["status"] for k, j in status.items()} == {
        "seed=0": "completed",
        "seed=1": "failed",
        "seed=2": "completed",
    }
    failed = status["seed=1"]
    assert failed["error"].startswith("FileExistsError") and str(bad) in failed["error"]
    assert failed["log"] == str(sweep / "synth_cam" / "seed_1" / "train.log")
    assert Path(failed["log"]).is_file()
    assert str(bad) in (sweep / "sweep_summary.md").read_text()
    for seed in (0, 2):
        assert (tmp_path / f"outputs/synth_cam/seed_{seed}/results.json").is_file()

    rep = subprocess.run(
        [sys.executable, str(ROOT / "report.py"), str(sweep), "--out", str(tmp_path / "rep")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    table = (tmp_path / "rep" / "table2.md").read_text()
    assert "| synth | cam | conta=off runs, round 0 | 2 |" in table  # seeds 0 and 2
    assert "Not in the table: 1 sweep job(s)" in table
    assert f"{sweep / 'synth_cam' / 'seed_1'}: failed: FileExistsError" in table
