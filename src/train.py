"""`train(cfg)`: the testable entry point behind `python train.py` (the Hydra shim only calls it)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from src.pipeline.driver import run_pipeline
from src.pipeline.preflight import run_preflight
from src.utils.io import atomic_write_text, run_write_error
from src.utils.ranks import (
    RankFailed,
    end_distributed,
    error_shown,
    exit_with_rank_zero,
    is_global_zero,
)

log = logging.getLogger(__name__)


RUN_DIR_FILE = "run_dir.txt"
# The exit status of a run stopped by SIGTERM (128 + 15, as the shell reports a process killed
# by it): not 0, so neither a scheduler nor a sweep mistakes the stopped run for a finished one.
SIGTERM_EXIT = 143


def record_run_dir(cfg: DictConfig) -> None:
    """In a Hydra job folder other than the run folder (a sweep's), name the run folder, so
    report.py can gather a sweep from its jobs."""
    from hydra.core.hydra_config import HydraConfig

    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    run_dir = Path(cfg.paths.run_dir).resolve()
    if job_dir != run_dir and is_global_zero():
        atomic_write_text(job_dir / RUN_DIR_FILE, f"{run_dir}\n")


def train(cfg: DictConfig) -> dict:
    """Run or resume the round pipeline (it prepares the data on rank 0); returns results.json.

    Under DDP a rank that fails where the ranks settle (see `ranks_settle`) has logged its
    error; every other rank logs one line; all of them exit with status 1 (SystemExit), so the
    error is shown once. A run stopped by SIGTERM (preemption) exits with status 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    stop_watch = exit_with_rank_zero()
    try:
        if cfg.get("preflight"):  # debug=preflight
            return run_preflight(cfg)
        return run_pipeline(cfg)  # prepares the data on rank 0 before fingerprinting it
    except SIGTERMException:
        # Lightning's loops stop after the batch in progress when SIGTERM arrives (a SLURM
        # preemption or time limit, `scancel`, submitit's requeue) and raise this SystemExit,
        # whose status is 0. The stage has no DONE.json; its last epoch-end checkpoint and the
        # finished stages are on disk, so rerunning the command resumes there.
        log.warning(
            "stopped by SIGTERM before the pipeline finished; rerun the same command to resume "
            "(finished stages are skipped, training continues from its last epoch's checkpoint)"
        )
        raise SystemExit(SIGTERM_EXIT) from None
    except RankFailed as error:
        log.error("%s", error)
        raise SystemExit(1) from None
    except Exception as error:
        if not error_shown(error):
            clear = run_write_error(error, cfg.paths)  # full disk / read-only folder: one line
            if clear is not None:
                raise clear from error
            raise
        raise SystemExit(1) from None
    finally:
        stop_watch()
        end_distributed()
