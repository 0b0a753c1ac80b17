"""Sweeps through hydra-submitit-launcher: `hydra/launcher=slurm` takes its resources from the
trainer config; `hydra/launcher=submitit_local` runs two tiny jobs whose run folders are those
of local runs, and report.py tabulates them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

import src  # noqa: F401  (registers the slurm_* resolvers, as train.py does)
from tests.conftest import CONF_DIR, TINY_OUTPUTS, report_table, tiny_cam_sweep

ROOT = Path(__file__).resolve().parents[1]


def _launcher(overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(
            "train",
            overrides=["experiment=voc", "hydra/launcher=slurm", *overrides],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer=ddp", "trainer.devices=8"], (1, 8, 8, 9)),
        (["trainer=gpu"], (1, 1, 1, 9)),
        (["trainer=cpu", "num_workers=3"], (1, 1, None, 4)),
        (["trainer=ddp", "+trainer.num_nodes=2", "trainer.devices=[0,1,2,3]"], (2, 4, 4, 9)),
    ],
)
def test_slurm_resources_come_from_the_trainer(overrides, expected):
    launcher = _launcher([*overrides, "hydra.launcher.partition=gpu"])
    assert launcher["_target_"] == "hydra_plugins.conta_sweeper.submitit_launchers.SlurmLauncher"
    from hydra_plugins.conta_sweeper.submitit_launchers import SlurmLauncher

    # by name: Hydra's plugin scan loads plugin modules anew, so class identity does not hold
    bases = {f"{c.__module__}.{c.__name__}" for c in SlurmLauncher.__mro__}
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in bases
    got = tuple(launcher[k] for k in ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task"))
    assert got == expected
    assert launcher["partition"] == "gpu"
    assert launcher["submitit_folder"].endswith("multirun/voc/.submitit/%j")


def test_slurm_refuses_a_device_count_left_to_the_node():
    with pytest.raises(InterpolationResolutionError, match="set trainer.devices=N"):
        _launcher(["trainer=ddp"])  # devices: -1


@pytest.mark.integration  # 40 s: two tiny method=cam jobs side by side
def test_two_submitit_local_jobs_run_and_report(tmp_path):
    done = tiny_cam_sweep(
        tmp_path, "0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"
    )
    assert done.returncode == 0, done.stderr[-4000:]
    sweep = tmp_path / TINY_OUTPUTS / "multirun" / "synth"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    for seed in (0, 1):
        # the job's run folder is the one a local run of that seed uses
        run = tmp_path / TINY_OUTPUTS / "synth_cam" / f"seed_{seed}"
        job = sweep / "synth_cam" / f"seed_{seed}"
        assert (job / "run_dir.txt").read_text().strip() == str(run)
        results = json.loads((run / "results.json").read_text())
        assert (results["method"], results["seed"]) == ("cam", seed)
        done_json = json.loads((run / "round_0" / "crf_segmenter" / "DONE.json").read_text())
        assert done_json["stage"] == "crf_segmenter"
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit keeps each job's logs"

    table = report_table(sweep, tmp_path / "rep")
    assert "| synth | cam | conta=off runs, round 0 | 2 |" in table
    assert "Not in the table" not in table


@pytest.mark.integration  # 20 s: three processes under submitit
def test_a_job_killed_outright_is_listed_and_the_others_kept(tmp_path):
    """Under `hydra/launcher=local` (submitit_local through the project's launcher class) a job
    whose process is SIGKILLed leaves no result; the other jobs' results are still collected
    and the summary names the killed one with submitit's error and its stderr file."""
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "killed_job_app.py"),
        "-m",
        "experiment=synth",
        "seed=0,1,2",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=5",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "1 of 3 jobs failed" in done.stderr, done.stderr[-4000:]
    sweep = tmp_path / "outputs" / "multirun" / "synth"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "failed", "completed"]
    for seed in (0, 2):
        assert (sweep / "synth_irnet_conta" / f"seed_{seed}" / "ran.txt").is_file()
    killed = jobs[1]
    assert killed["job_dir"] == str(sweep / "synth_irnet_conta" / "seed_1")
    assert killed["log"].endswith("_log.err") and Path(killed["log"]).is_file()
    assert killed["error"].startswith(("UncompletedJobError", "FailedJobError")), killed
