"""`train(cfg)`: the testable entry point behind `python train.py` (the Hydra shim only calls it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from src.pipeline.driver import run_pipeline
from src.pipeline.preflight import run_preflight
from src.utils.io import atomic_write_text, run_write_error
from src.utils.ranks import RankFailed, end_distributed, error_shown, exit_with_rank_zero

log = logging.getLogger(__name__)


RUN_DIR_FILE = "run_dir.txt"


def record_run_dir(cfg: DictConfig) -> None:
    """In a Hydra job folder other than the run folder (a sweep's), name the run folder, so
    report.py can gather a sweep from its jobs."""
    from hydra.core.hydra_config import HydraConfig

    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    run_dir = Path(cfg.paths.run_dir).resolve()
    if job_dir != run_dir and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        atomic_write_text(job_dir / RUN_DIR_FILE, f"{run_dir}\n")


def train(cfg: DictConfig) -> dict:
    """Run or resume the round pipeline (it prepares the data on rank 0); returns results.json.

    Under DDP a rank that fails where the ranks settle (see `ranks_settle`) has logged its
    error; every other rank logs one line; all of them exit with status 1 (SystemExit), so the
    error is shown once."""
    stop_watch = exit_with_rank_zero()
    try:
        if cfg.get("preflight"):  # debug=preflight
            return run_preflight(cfg)
        return run_pipeline(cfg)  # prepares the data on rank 0 before fingerprinting it
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
