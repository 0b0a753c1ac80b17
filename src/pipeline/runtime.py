"""What every stage needs from its environment: trainers, loggers, seeds and rank coordination."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

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


def picked_config(cfg: DictConfig, keys: list[str]) -> dict:
    """The resolved config subtrees a stage depends on."""
    return {k: _resolved(OmegaConf.select(cfg, k)) for k in keys}


# How stage seeds are drawn (see stage_seed); part of every hash, so runs finished under an
# earlier scheme (a seed per round) are redone rather than mixed with this one's.
SEEDING = "per-stage"


def config_hash(cfg: DictConfig, keys: list[str], upstream: list[str]) -> str:
    """Hash of the resolved config subtrees a stage depends on, chained with its inputs' hashes."""
    blob = json.dumps(
        {"cfg": picked_config(cfg, keys), "upstream": upstream, "seeding": SEEDING},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _resolved(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def stage_seed(base_seed: int, stage: str) -> int:
    """A distinct, reproducible seed per (seed, stage), the same in every round: rounds then
    share their random numbers (init, data order, augmentation) and differ by M alone."""
    digest = hashlib.sha1(f"{base_seed}/{stage}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


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


def log_figure(loggers: list[Logger], key: str, path: Path) -> None:
    """Send a saved PNG to the loggers that show images (CSV keeps only the file)."""
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
    """A fresh Trainer per stage (a Trainer reused after fit silently does nothing)."""
    cbs = build_callbacks(cfg, stage_dir) if training else _progress_only(cfg)
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
