"""What every stage needs from its environment: trainers, loggers, seeds and rank coordination."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from src.callbacks.finite_loss import FiniteLoss

log = logging.getLogger(__name__)


def global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # Lightning's subprocess launcher sets these before the process group exists.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def is_global_zero() -> bool:
    return global_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# Failures under DDP. Rank-0-only work used to end at a bare barrier: when rank 0 raised, the
# other ranks sat in that barrier until the collective timeout (30 min; under gloo they instead
# died of "connection closed" with a second, misleading traceback). A settle replaces such a
# barrier: every rank learns whether any rank failed, the failed one logs its error once, the
# others raise RankFailed, which `src.train.train` prints as one line; all exit with status 1.

T = TypeVar("T")
LAUNCHER_PID = "WSSS_LAUNCHER_PID"  # rank 0's pid, for the ranks Lightning starts as its children


class RankFailed(RuntimeError):
    """Another rank failed in a section every rank shares; that rank shows the error itself."""


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def ranks_settle(what: str) -> Iterator[None]:
    """A barrier that cannot hang on a failed rank, after a block that holds no collective:
    every rank runs the block, then all of them learn which ranks failed in it, and with what.

    A rank whose block raised re-raises its error, marked as shown (see `error_shown`), after
    logging it with its traceback, unless a lower rank failed with the same message (a bad
    setting fails every rank alike): then it logs one line naming that rank. The others raise
    RankFailed. No-op in a single process. The block must not itself wait on other ranks: a
    rank failing inside a collective is Lightning's to handle."""
    if not _several_ranks():
        yield
        return
    try:
        yield
    except Exception as error:
        rank, message = dist.get_rank(), f"{type(error).__name__}: {error}"
        same = [r for r, m in enumerate(_rank_errors(message)) if m == message and r < rank]
        if same:
            log.error("rank %d failed in %s with the same error as rank %d", rank, what, same[0])
        else:
            log.error("rank %d failed in %s", rank, what, exc_info=error)
        with suppress(AttributeError):  # an exception type that takes no attributes
            error._shown_by_rank = True  # type: ignore[attr-defined]
        raise
    failed = [rank for rank, message in enumerate(_rank_errors(None)) if message is not None]
    if failed:
        raise RankFailed(f"rank {failed[0]} failed in {what}; see its error")


def run_on_rank_zero(fn: Callable[[], T], what: str) -> T | None:
    """fn() on rank 0 while the other ranks wait (None there); they all leave together, each
    with rank 0's failure if fn raised (the error itself on rank 0, RankFailed elsewhere)."""
    result = None
    with ranks_settle(what):
        if is_global_zero():
            result = fn()
    return result


def _rank_errors(message: str | None) -> list[str | None]:
    """Every rank's error message (None: no error), by rank."""
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)  # the barrier itself; objects work under NCCL too
    return messages


def error_shown(error: BaseException) -> bool:
    """True for an error its rank already logged in full (in a `ranks_settle` block)."""
    return getattr(error, "_shown_by_rank", False) is True


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


def end_distributed() -> None:
    """Destroy the process group (local, no collective) so that exiting waits on no peer."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_with_rank_zero(poll_s: float = 1.0) -> Callable[[], None]:
    """Lightning's launcher starts ranks 1.. as children of rank 0's process. Rank 0 notes its
    pid here for them; such a child then exits (status 1, one line) once rank 0's process is
    gone, wherever either was: a backstop for failures outside a settle (e.g. rank 0 failing in
    a trainer under NCCL, whose collectives wait out their timeout on a dead peer). Ranks another
    launcher started (torchrun, SLURM) are left to it. Returns the function that stops the watch
    (call it when done). The converse, a child failing, Lightning's launcher handles: it kills
    rank 0 when a child exits non-zero."""
    if is_global_zero():
        os.environ[LAUNCHER_PID] = str(os.getpid())
        return lambda: None
    parent = os.getppid()
    if os.environ.get(LAUNCHER_PID) != str(parent):
        return lambda: None
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent:
                rank = global_rank()
                log.error("rank %d: rank 0 (pid %d) has ended; stopping too", rank, parent)
                for stream in (sys.stdout, sys.stderr):
                    with suppress(Exception):
                        stream.flush()
                os._exit(1)

    threading.Thread(target=watch, name="rank-zero-watch", daemon=True).start()
    return done.set


def wandb_logged_in() -> bool:
    """True when W&B credentials exist; otherwise runs are logged offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_loggers(cfg: DictConfig, round_idx: int, stage: str, stage_dir: Path) -> list[Logger]:
    """One logger of each configured kind per (round, stage); W&B runs are grouped by experiment."""
    loggers: list[Logger] = []
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        lg_cfg = OmegaConf.create(OmegaConf.to_container(lg_cfg, resolve=True))
        with open_dict(lg_cfg):
            lg_cfg.save_dir = str(stage_dir / "logs")
            if lg_cfg._target_.endswith("WandbLogger"):
                if lg_cfg.get("offline", "auto") == "auto":
                    lg_cfg.offline = not wandb_logged_in()
                lg_cfg.name = f"r{round_idx}_{stage}"
                lg_cfg.job_type = stage
                lg_cfg.group = cfg.experiment_name
                lg_cfg.reinit = "finish_previous"
            else:
                lg_cfg.name, lg_cfg.version = "", ""
        (stage_dir / "logs").mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(lg_cfg))
        log.debug("logger %s for %s", name, stage)
    return loggers


def finish_loggers(loggers: list[Logger], status: str = "success") -> None:
    for lg in loggers:
        lg.finalize(status)
        if isinstance(lg, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)


def log_metrics(loggers: list[Logger], metrics: dict, step: int = 0) -> None:
    flat = {k: float(v) for k, v in _flatten(metrics).items() if isinstance(v, int | float)}
    for lg in loggers:
        lg.log_metrics(flat, step=step)


def log_figure(loggers: list[Logger], key: str, path: Path | None) -> None:
    """Send a saved PNG to the loggers that show images (CSV keeps only the file). Ranks other
    than 0 have no loggers and no figure (None)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[str(path)])
        elif isinstance(lg, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            lg.experiment.add_image(
                key, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC"
            )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


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
    return instantiate(
        cfg.trainer,
        default_root_dir=str(stage_dir),
        logger=loggers or False,
        callbacks=cbs + list(callbacks or []),
        enable_checkpointing=training
        and any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in cbs),
        **overrides,
    )


def _progress_only(cfg: DictConfig) -> list[L.Callback]:
    return [
        instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c and "ProgressBar" in c._target_
    ]
