"""The sweeper of conf/hydra/default.yaml (`hydra.sweeper._target_`): Hydra's basic sweeper that
lets every job of a sweep run whatever another job does, then writes the sweep's summary.

Hydra's BasicSweeper raises the first failed job's exception after its batch (and so never runs
the later batches); this one collects every job's JobReturn from whatever launcher ran it
(basic, joblib, submitit: the launcher returns them in the sweep's process), writes
`sweep_summary.json` and `sweep_summary.md` into the sweep folder (per job: its overrides, its
folder, status, error and log file) and only then fails, with one line per failed job, so the
sweep's exit status still says that something failed. `python report.py <sweep folder>` builds
Table 2 from the finished jobs and lists the failed ones from the summary.

It lives in the `hydra_plugins` namespace package because Hydra instantiates sweepers only from
there (hydra.core.plugins.Plugins._instantiate).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"


class SweepFailed(RuntimeError):
    """Some jobs of the sweep failed; the others ran. The message lists each failed job."""


def _log_file(ret: JobReturn) -> str | None:
    """The job's log: Hydra's `<job name>.log` in its folder (under submitit, the job's stdout
    and stderr are also in the launcher's submitit_folder, .submitit/<job id>/)."""
    if ret.hydra_cfg is None:
        return None
    hydra = ret.hydra_cfg.hydra  # working_dir is the cwd (hydra.job.chdir: false)
    return str(Path(hydra.runtime.output_dir) / f"{hydra.job.name}.log")


def _error(ret: JobReturn) -> str | None:
    if ret.status != JobStatus.FAILED:
        return None
    err = ret._return_value
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:2000]


def job_record(ret: JobReturn, overrides: Sequence[str], num: int) -> dict[str, Any]:
    return {
        "num": num,
        "overrides": list(overrides),
        "status": {JobStatus.COMPLETED: "completed", JobStatus.FAILED: "failed"}.get(
            ret.status, "unknown"
        ),
        # a job that left no result (submitit_launchers.py) carries these itself
        "job_dir": getattr(ret, "job_dir", None)
        or (None if ret.hydra_cfg is None else str(ret.hydra_cfg.hydra.runtime.output_dir)),
        "error": _error(ret),
        "log": getattr(ret, "log_file", None) or _log_file(ret),
    }


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _varying(jobs: list[dict[str, Any]]) -> dict[int, str]:
    """Per job, the overrides that not every job shares (all of them for a one-job sweep)."""
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    return {j["num"]: " ".join(o for o in j["overrides"] if o not in common) for j in jobs}


def render_summary(jobs: list[dict[str, Any]]) -> str:
    failed = [j for j in jobs if j["status"] != "completed"]
    varying = _varying(jobs)
    lines = [
        "# Sweep summary",
        "",
        f"{len(jobs) - len(failed)} of {len(jobs)} jobs completed, {len(failed)} failed.",
        "",
        "| # | Overrides (those the jobs differ in) | Status | Error | Log |",
        "|---|---|---|---|---|",
    ]
    for j in jobs:
        err = (j["error"] or "").replace("|", "\\|")
        lines.append(
            f"| {j['num']} | {varying[j['num']]} | {j['status']} | {err} | {j['log'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, jobs: list[dict[str, Any]]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(sweep_dir / SUMMARY_JSON, json.dumps({"jobs": jobs}, indent=2) + "\n")
    _atomic_write(sweep_dir / SUMMARY_MD, render_summary(jobs))


class SummarySweeper(BasicSweeper):
    """BasicSweeper (grid over the command line's comma lists, `max_batch_size` jobs per launch)
    whose sweep runs every batch, records every job and fails at the end, not at the first."""

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(
            parser.parse_overrides(params_conf), self.max_batch_size
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns: list[Sequence[JobReturn]] = []
        jobs: list[dict[str, Any]] = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for i, (ret, overrides) in enumerate(zip(results, batch, strict=True)):
                jobs.append(job_record(ret, overrides, initial_job_idx + i))
            initial_job_idx += len(batch)
            returns.append(results)
            write_summary(sweep_dir, jobs)  # after every batch: a sweep cut short keeps it

        failed = [j for j in jobs if j["status"] != "completed"]
        summary = sweep_dir / SUMMARY_MD
        log.info(
            "%d of %d jobs completed; summary: %s", len(jobs) - len(failed), len(jobs), summary
        )
        if failed:
            varying = _varying(jobs)
            lines = [
                f"job {j['num']} ({varying[j['num']]}): {j['error']} (log: {j['log']})"
                for j in failed
            ]
            raise SweepFailed(
                f"{len(failed)} of {len(jobs)} jobs failed (the others ran; summary: {summary}; "
                "`python report.py "
                f"{sweep_dir}` tabulates the finished ones):\n  " + "\n  ".join(lines)
            )
        return returns
