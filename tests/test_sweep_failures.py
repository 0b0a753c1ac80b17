"""A sweep survives a bad job: under the basic and the joblib launcher, one job failing (its run
folder is taken by a damaged file) leaves the others to finish; the sweep summary lists the
failed job with its error and log, the sweep exits non-zero, and report.py tabulates the finished
runs and lists the missing one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_OUTPUTS, report_table, tiny_cam_sweep

ROOT = Path(__file__).resolve().parents[1]


# Three tiny method=cam runs: 30 s with the basic launcher (in CI), 40 s with joblib (slow).
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([], id="basic", marks=pytest.mark.integration),
        pytest.param(
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
            id="joblib",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_failed_job_leaves_the_others_and_is_listed(tmp_path, launcher):
    bad = tmp_path / TINY_OUTPUTS / "synth_cam" / "seed_1"
    bad.parent.mkdir(parents=True)
    bad.write_text("a damaged run folder of seed 1\n")
    done = tiny_cam_sweep(tmp_path, "0,1,2", *launcher)
    assert done.returncode != 0, "a sweep with a failed job must say so in its exit status"
    assert "1 of 3 jobs failed" in done.stderr, done.stderr[-4000:]

    sweep = tmp_path / TINY_OUTPUTS / "multirun" / "synth"
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
        assert (tmp_path / TINY_OUTPUTS / f"synth_cam/seed_{seed}/results.json").is_file()

    table = report_table(sweep, tmp_path / "rep")
    assert "| synth | cam | conta=off runs, round 0 | 2 |" in table  # seeds 0 and 2
    assert "Not in the table: 1 sweep job(s)" in table
    assert f"{sweep / 'synth_cam' / 'seed_1'}: failed: FileExistsError" in table
