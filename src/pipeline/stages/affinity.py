"""The affinity-net family (method=irnet, method=seam): a network trained on confident labels
from the CAMs whose pixel affinities drive a random walk from the CAMs to pseudo-masks. What the
methods of the family share: the `affinity` role, building the configured affinity module,
training it on the `affinity_labels` role, and the CAM batches of the walk."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset, default_collate

from src.callbacks.prediction_writer import PngPredictionWriter
from src.datamodules import build_dataset, eval_transform
from src.datamodules.datamodule import inference_loader, training_loader
from src.models.optim import momentum_of
from src.pipeline.artifacts import missing_items, resume_counts
from src.pipeline.batching import batch_metrics, split_over_ranks
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.cam import load_classifier_backbone, read_weights
from src.pipeline.stages.pseudo_masks import AFFINITY_LABEL_DIR, MASK_DIR, label_png_loader
from src.pipeline.trainers import build_trainer
from src.utils.errors import MissingArtifactError
from src.utils.ranks import barrier
from src.utils.weights import save_weights

log = logging.getLogger(__name__)

# The role the family adds (src/pipeline/stage.py ROLES holds the shared ones).
ROLES = {"affinity": "the trained affinity network"}


def build_affinity_module(cfg: DictConfig, classifier_dir: Path | None) -> L.LightningModule:
    """The method's affinity module from `affinity.net` / `affinity.module` / `optimizer` /
    `scheduler` (IRNet's AffinityNet, PSA's PSAAffinityNet). The backbone is cfg.backbone with
    `affinity.backbone` merged on top (PSA: output stride 8, frozen BN); `affinity.backbone_init`:
    pretrained (the backbone config's weights, ImageNet as both papers) or cam (this round's
    classifier backbone: the synthetic set has no ImageNet weights)."""
    aff = cfg.affinity
    overrides = OmegaConf.to_container(aff.backbone, resolve=True) if aff.get("backbone") else {}
    backbone = instantiate(cfg.backbone, **overrides)
    if aff.backbone_init == "cam":
        load_classifier_backbone(backbone, classifier_dir, "affinity.backbone_init")
    elif aff.backbone_init != "pretrained":
        raise ValueError(f"affinity.backbone_init={aff.backbone_init!r}: use pretrained|cam")
    return instantiate(aff.module, _convert_="all")(
        instantiate(aff.net, _convert_="all")(backbone),
        num_classes=cfg.data.num_classes,
        optimizer=instantiate(aff.optimizer),
        scheduler=instantiate(aff.scheduler),
    )


def fit_on_affinity_labels(ctx: StageContext, module, transform, weights_file: str) -> dict:
    """Train an affinity module (IRNet's or PSA's) on the training images with the round's
    affinity labels as `ir_label`, save its net as `weights_file`; returns the stage metrics."""
    cfg, aff = ctx.cfg, ctx.cfg.affinity
    label_dir = ctx.inputs["affinity_labels"] / AFFINITY_LABEL_DIR
    extras = {"ir_label": label_png_loader(label_dir, "the affinity-label stage")}
    dataset = build_dataset(cfg.data, cfg.data.train_split, transform, extras=extras)
    trainer = build_trainer(
        cfg, ctx.dir, ctx.loggers, training=True, max_epochs=aff.max_epochs, limit_val_batches=0
    )
    share = split_over_ranks(trainer, aff.batch_size, "affinity.batch_size")
    loader = training_loader(dataset, share.per_rank, cfg.num_workers)
    trainer.fit(
        module, train_dataloaders=loader, ckpt_path=ctx.checkpoint_to_resume(), weights_only=True
    )
    if trainer.is_global_zero:
        save_weights(ctx.dir / weights_file, module.net.state_dict())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["momentum"] = momentum_of(trainer.optimizers)
    metrics["resume"] = ctx.training_resume(trainer)
    metrics.update(batch_metrics(trainer, share))
    return metrics


def load_trained_affinity(ctx: StageContext, weights_file: str, trained_by: str):
    """The round's affinity module with the net the `trained_by` stage saved as `weights_file`."""
    module = build_affinity_module(ctx.cfg, ctx.inputs.get("classifier"))
    weights = ctx.inputs["affinity"] / weights_file
    if not weights.is_file():
        raise MissingArtifactError(f"{weights} missing: re-run {trained_by}")
    module.net.load_state_dict(read_weights(weights, trained_by))
    return module


def walk_to_pseudo_masks(
    ctx: StageContext, module: L.LightningModule, with_cams: Callable[[Dataset], Dataset]
) -> StageResult:
    """The pseudo-mask of every training image still without one (`<stage dir>/masks/`, written
    atomically, so an interrupted attempt's files are kept): `with_cams(dataset)` adds each
    image's walk input, the module walks it; the trainer shards the images over the ranks."""
    cfg = ctx.cfg
    dataset = build_dataset(
        cfg.data, cfg.data.train_split, eval_transform(cfg.data.mean, cfg.data.std)
    )
    out_dir = ctx.dir / MASK_DIR
    todo = missing_items(dataset.ids, (out_dir, ".png"))
    barrier()  # every rank has listed the same todo before any rank writes
    log.info("%s: %d of %d images", ctx.name, len(todo), len(dataset))
    if todo:
        loader = inference_loader(
            Subset(with_cams(dataset), todo),
            cfg.affinity.inference_batch_size,
            cfg.num_workers,
            collate_with_cams,
        )
        writer = PngPredictionWriter(out_dir, key="mask")
        trainer = build_trainer(cfg, ctx.dir, [], training=False, callbacks=[writer])
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    barrier()  # every rank's shard is on disk before the count
    resume = resume_counts(dataset.ids, todo, (out_dir, ".png"))
    return StageResult(metrics={"images": len(dataset), "resume": resume}, artifacts=[MASK_DIR])


def collate_with_cams(samples: list[dict]) -> dict:
    """Per-image CAMs and keys as lists; tensors whose shapes differ across the images (the
    image, the mask of VOC's varying sizes) as lists too, the rest stacked. The affinity
    modules run their net on each listed image alone and walk the batch at once."""
    ragged = {k: [s.pop(k) for s in samples] for k in ("cam", "keys")}
    for key, value in samples[0].items():
        arrays = isinstance(value, torch.Tensor | np.ndarray)
        if arrays and len({tuple(s[key].shape) for s in samples}) > 1:
            ragged[key] = [s[key] for s in samples]
    rest = [{k: v for k, v in s.items() if k not in ragged} for s in samples]
    return {**default_collate(rest), **ragged}
