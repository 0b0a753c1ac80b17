"""`train(cfg)`: the testable entry point behind `python train.py` (the Hydra shim only calls it)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from src.datamodules import prepare_data
from src.pipeline.driver import run_pipeline
from src.pipeline.runtime import barrier, is_global_zero

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Prepare the data (rank 0), then run or resume the round pipeline; returns results.json."""
    if is_global_zero():
        prepare_data(cfg.data)
    barrier()
    return run_pipeline(cfg)
