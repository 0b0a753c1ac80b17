"""hydra-submitit-launcher's launchers, collecting every job: `hydra/launcher=slurm` and
`hydra/launcher=local` (conf/hydra/launcher/) use these.

The plugin's `launch` ends with `[j.results()[0] for j in jobs]`: a job whose process died
without a result (SIGKILL, out of memory, a node lost, cancelled) raises there, in the sweep's
process, and the results of every other job are dropped with it. Here each job is collected on
its own; such a job becomes a failed JobReturn whose error is submitit's and whose log is the
job's stderr file, so the sweeper (conta_sweeper.py) lists it in sweep_summary.* beside the
others."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _collect(launcher: plugin.BaseSubmititLauncher, jobs: list, batch) -> list[JobReturn]:
    returns = []
    for job, overrides in zip(jobs, batch, strict=True):
        try:
            returns.append(job.results()[0])
        except Exception as error:  # the job left no result: submitit says why
            log.error(
                "job %s (%s) ended without a result: %s",
                job.job_id,
                " ".join(overrides),
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            ret = JobReturn(overrides=list(overrides))
            ret.return_value = error
            ret.status = JobStatus.FAILED
            ret.log_file = str(job.paths.stderr)  # type: ignore[attr-defined]
            ret.job_dir = _job_dir(launcher, overrides)  # type: ignore[attr-defined]
            returns.append(ret)
    return returns


def _job_dir(launcher: plugin.BaseSubmititLauncher, overrides: Sequence[str]) -> str | None:
    """The job's Hydra folder (hydra.sweep.dir / hydra.sweep.subdir of its config)."""
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, list(overrides)
        )
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)
        return str(Path(sweep["dir"]) / sweep["subdir"])
    except Exception:  # a subdir naming hydra's runtime keys: the summary then names none
        return None


class _Collecting:
    """The plugin's `launch` (hydra-submitit-launcher 1.2.0, copied: the collection is its last
    line), with its jobs collected one by one."""

    _EXECUTOR: str
    params: dict
    config: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        assert self.config is not None and len(job_overrides) > 0
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": self.params["submitit_folder"]}
        init_params.update(
            {f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init_keys}
        )
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        init_keys = specific_init_keys | {"submitit_folder"}
        executor.update_parameters(
            **{
                k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items()
                if k not in init_keys
            }
        )
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (
                    list(overrides),
                    "hydra.sweep.dir",
                    idx,
                    f"job_id_for_{idx}",
                    Singleton.get_state(),
                )
            )
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        return _collect(self, jobs, job_overrides)  # type: ignore[arg-type]


class SlurmLauncher(_Collecting, plugin.SlurmLauncher):
    pass


class LocalLauncher(_Collecting, plugin.LocalLauncher):
    pass
