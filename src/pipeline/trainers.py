"""The Trainer of a stage, built from the trainer config with its callbacks, and the ranks an
invocation runs on (started early when a sharded stage runs before any trainer)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from src.callbacks.finite_loss import FiniteLoss

log = logging.getLogger(__name__)


def start_ranks(cfg: DictConfig) -> None:
    """Start the configured ranks now if no trainer of this invocation has yet, so a sharded
    stage that runs first (a resume, a forced evaluation) is shared too. Lightning's launcher
    re-runs the command for ranks 1..; they replay the driver, skip the finished stages and join
    here. A later trainer finds the process group up and starts nothing more."""
    if dist.is_available() and dist.is_initialized():
        return
    trainer = _configured_trainer(cfg)
    if trainer is not None and trainer.world_size > 1:
        trainer.strategy.launcher.launch(trainer.strategy.setup_environment, trainer=trainer)


def ranks_started_outside(cfg: DictConfig) -> bool:
    """Whether other ranks of this run were started beside this process rather than by it:
    several nodes (`trainer.num_nodes` > 1: one process per node is started by whoever starts
    the job), torchrun (RANK), srun with one task per rank (SLURM_NTASKS > 1). Such ranks run the
    driver from its first line at the same time as rank 0, so the process group must exist
    before the first rank-0 section (writing the config, preparing and fingerprinting the
    data): without it they would not wait for rank 0 (see `run_pipeline`). Under Lightning's
    launcher on one node, ranks 1.. start only once rank 0 has done those."""
    env = os.environ
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    return nodes > 1 or "RANK" in env or int(env.get("SLURM_NTASKS", 1)) > 1


def configured_world_size(cfg: DictConfig) -> int:
    """The ranks this invocation runs on: the process group's, or those the trainer config asks
    for (devices x nodes, as Lightning resolves `auto`, -1 or a device list)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    trainer = _configured_trainer(cfg)
    return 1 if trainer is None else trainer.world_size


def _configured_trainer(cfg: DictConfig) -> L.Trainer | None:
    """A bare Trainer of the trainer config (nothing launched), or None for one device."""
    trainer_cfg = cfg.trainer
    if trainer_cfg.get("devices", 1) == 1 and trainer_cfg.get("num_nodes", 1) == 1:
        return None
    return instantiate(
        trainer_cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )


def build_callbacks(cfg: DictConfig, stage_dir: Path) -> list[L.Callback]:
    callbacks = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        if cb_cfg._target_.endswith("ModelCheckpoint"):
            callbacks.append(instantiate(cb_cfg, dirpath=str(stage_dir / "checkpoints")))
        else:
            callbacks.append(instantiate(cb_cfg))
    return callbacks


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    loggers: list[Logger],
    *,
    training: bool,
    callbacks: list[L.Callback] | None = None,
    **overrides,
) -> L.Trainer:
    """A fresh Trainer per stage (a Trainer reused after fit silently does nothing). A training
    trainer always stops at a non-finite loss (FiniteLoss), whatever `callbacks` says."""
    cbs = [*build_callbacks(cfg, stage_dir), FiniteLoss()] if training else _progress_only(cfg)
    remove_hpc_checkpoints(stage_dir)
    return instantiate(
        cfg.trainer,
        default_root_dir=str(stage_dir),
        logger=loggers or False,
        callbacks=cbs + list(callbacks or []),
        enable_checkpointing=training
        and any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in cbs),
        **overrides,
    )


HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


def remove_hpc_checkpoints(stage_dir: Path) -> None:
    """Remove the checkpoints Lightning's SLURM auto-requeue wrote into this stage's folder.

    In a job started by plain `sbatch` (no submitit), SLURM's SIGUSR1 reaches Lightning's own
    handler (SLURMEnvironment, auto_requeue), which saves `hpc_ckpt_<n>.ckpt` into the trainer's
    default_root_dir, the stage folder, and requeues the job. The rerun would then resume from
    it whenever no ckpt_path is passed (Lightning picks it under SLURM), but it is taken
    mid-epoch, where a resume cannot replay the uninterrupted run (src/callbacks/rng_state.py).
    The stage resumes from its epoch-end last.ckpt instead (Stage.checkpoint_to_resume), so the
    requeue is Lightning's and the resume exact. Under submitit (hydra/launcher=slurm), submitit
    handles SIGUSR1 itself and Lightning writes none of these."""
    for path in sorted(Path(stage_dir).glob(HPC_CHECKPOINTS)):
        log.info("%s: a mid-epoch SLURM requeue checkpoint, not resumable exactly: removed", path)
        path.unlink(missing_ok=True)


def _progress_only(cfg: DictConfig) -> list[L.Callback]:
    return [
        instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c and "ProgressBar" in c._target_
    ]
