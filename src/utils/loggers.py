"""The loggers of a stage (CSV, TensorBoard, W&B offline unless logged in) and what is sent to them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


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
