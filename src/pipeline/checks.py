"""What the driver checks before the first stage, so that a run fails in seconds, not hours in.

Each check stands for an error a stage would otherwise meet late: a setting of the wrong type
(`schema.py`), a data folder or split list that is not there, an accelerator this machine does
not have, pretrained weights that are neither cached nor downloadable. Each raises a UserError
naming the key or file and the fix; `python train.py` shows it as one line and exits with 2.
"""

from __future__ import annotations

import logging

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.datamodules.validation import DatasetError, check_file, check_root
from src.pipeline.plan import PipelineError
from src.pipeline.schema import check_config_types
from src.utils.errors import UserError
from src.utils.ranks import is_global_zero

log = logging.getLogger(__name__)

# Config nodes that build a pretrained network: the checks load their weights once up front.
PRETRAINED_NETS = ("backbone", "segmenter.backbone", "seeded.backbone")


def check_before_work(cfg: DictConfig) -> None:
    """Every start-up check, cheapest first (the weights may download)."""
    check_config_types(cfg)
    check_accelerator(cfg)
    check_data_files(cfg)
    if is_global_zero():  # ranks started later replay the driver: one download, not one a rank
        check_weights(cfg)


def check_accelerator(cfg: DictConfig) -> None:
    """The trainer's accelerator must exist here: Lightning would say so only when the first
    training stage builds its trainer."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    available = {"gpu": CUDAAccelerator.is_available() or MPSAccelerator.is_available()}
    available["cuda"] = CUDAAccelerator.is_available()
    available["mps"] = MPSAccelerator.is_available()
    if not available.get(accelerator, True):
        raise PipelineError(
            f"trainer.accelerator={accelerator} but this machine has no such device. Fix: run on "
            "a machine with one, or add `trainer=cpu` (e.g. for a preflight: `debug=preflight "
            "trainer=cpu`)."
        )


def check_data_files(cfg: DictConfig) -> None:
    """The data root and the list / annotation file of every split the run reads (the generated
    synthetic set is made by the driver, so it is not checked here)."""
    data = cfg.data
    if data.get("name") == "synth":
        return
    root = check_root(data.root)
    splits = data.get("splits") or {}
    for key in ("train_split", "eval_split", "val_split"):
        name = data.get(key)
        if name is None:
            continue
        if name not in splits:
            raise DatasetError(
                f"data.{key}={name!r} is not among the configured splits {list(splits)}. Fix: "
                f"use one of them or add data.splits.{name}."
            )
        spec = splits[name]
        if data.get("format", "voc") == "coco":
            check_file(root / spec.annotations, f"{name} annotations", _fix(name, "annotations"))
            if not (root / spec.images).is_dir():
                raise DatasetError(
                    f"{name} image folder {root / spec.images} not found. Fix: "
                    f"{_fix(name, 'images')}"
                )
        else:
            check_file(root / spec.list, f"{name} list", _fix(name, "list"))


def _fix(split: str, key: str) -> str:
    return f"point data.root at the data set folder, or data.splits.{split}.{key} at the file"


def check_weights(cfg: DictConfig) -> None:
    """Build each pretrained network once: its weights load from the torch hub cache or
    download now (WeightsUnavailableError, with the offline fix, otherwise)."""
    for key in PRETRAINED_NETS:
        node = OmegaConf.select(cfg, key)
        if node is None or "_target_" not in node:
            continue
        if not (node.get("weights") or node.get("weights_path")):
            continue
        log.info("checking the pretrained weights of %s", key)
        try:
            instantiate(node)
        except InstantiationException as error:  # Hydra wraps what the constructor raised
            if isinstance(error.__cause__, UserError):
                raise error.__cause__ from None
            raise
