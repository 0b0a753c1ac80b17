"""CONTA step 4, the `confounders` stage: the round's segmenter predicts every training image and
ConfounderUpdate turns that into C, P(c) and each image's m for the next round's classifier."""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from src.callbacks.confounder_update import ConfounderUpdate
from src.datamodules import build_dataset
from src.evaluation.figures import overlay_grid
from src.models.context import Confounders, build_confounders, resize_nearest
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.segmenter import full_image_loader, load_trained_segmenter
from src.pipeline.trainers import build_trainer
from src.utils.loggers import log_figure
from src.utils.ranks import run_on_rank_zero

log = logging.getLogger(__name__)


def make_confounders(ctx: StageContext) -> StageResult:
    """C = class-wise average of the round's segmentation masks over the training images that
    contain each class (full-image frame, resized to conta.size), P(c), and every image's m.

    ``conta.c_source=gt`` takes the ground-truth masks instead (the intervention's ceiling);
    ``conta.c_source=mean`` builds them from the prediction, then replaces every c_i by the mean
    of C (a control: C without class information); ``conta.m_source=shuffled`` gives every image
    another image's m (a control)."""
    cfg = ctx.cfg
    # The val images get an m too (the classifier's validation reads it) but do not shape C.
    datasets = {s: build_dataset(cfg.data, s) for s in (cfg.data.train_split, cfg.data.val_split)}
    train_set = datasets[cfg.data.train_split]
    splits = list(datasets)
    class_names = list(train_set.class_names)[1:]
    split_ids = [d.ids for d in datasets.values()]
    options = dict(
        num_classes=cfg.data.num_classes - 1,
        class_names=class_names,
        encoding=cfg.conta.mask_encoding,
        prior=cfg.conta.prior,
        context=cfg.conta.context,
    )
    if cfg.conta.c_source == "gt":

        def from_ground_truth() -> Confounders:
            built = _shuffled(_from_ground_truth(cfg, datasets, options), cfg, split_ids)
            built.save(ctx.dir)
            return built

        # Rank 0 builds and writes while the others wait; its failure ends them all at once.
        confounders = run_on_rank_zero(from_ground_truth, "confounders (c_source=gt)")
    else:
        module = load_trained_segmenter(cfg, ctx.inputs["segmenter"])
        callback = ConfounderUpdate(
            ctx.dir,
            size=tuple(cfg.conta.size),
            dataset_name=cfg.data.name,
            center_ids=train_set.ids,
            transform=lambda c: _shuffled(c, cfg, split_ids),
            **options,
        )
        trainer = build_trainer(cfg, ctx.dir, [], training=False, callbacks=[callback])
        trainer.predict(
            module, dataloaders=full_image_loader(cfg, splits), return_predictions=False
        )
        confounders = callback.result  # built and saved on rank 0 only
    if confounders is None:
        return StageResult(metrics={}, artifacts=[])
    figure = _confounder_figure(confounders, ctx)
    log_figure(ctx.loggers, "conta/confounders", figure)
    metrics = {
        "images": len(confounders.ids),
        "c_source": confounders.c_source,
        "m_source": confounders.m_source,
        "counts": dict(zip(class_names, confounders.counts.tolist(), strict=True)),
        "prior": dict(zip(class_names, confounders.prior.tolist(), strict=True)),
        "mean_mask": float(confounders.masks.mean()),
    }
    return StageResult(metrics=metrics, artifacts=["confounders.npz", figure.name])


def _from_ground_truth(cfg: DictConfig, datasets: dict, options: dict) -> Confounders:
    """C and m from every image's ground-truth mask (255 = ignore counts as background)."""
    small, labels = {}, {}
    for dataset in datasets.values():
        for i, image_id in enumerate(dataset.ids):
            small[image_id] = resize_nearest(dataset.load_mask(i), cfg.conta.size)
            labels[image_id] = dataset.labels[i]
    return build_confounders(
        small,
        labels,
        size=tuple(cfg.conta.size),
        dataset=cfg.data.name,
        center_ids=set(datasets[cfg.data.train_split].ids),
        c_source="gt",
        **options,
    )


def _shuffled(confounders: Confounders, cfg: DictConfig, split_ids: list) -> Confounders:
    """The controls applied to the built set: c_source=mean, then m_source=shuffled."""
    if cfg.conta.c_source == "mean":
        confounders = confounders.with_mean_centers()
    if cfg.conta.m_source != "shuffled":
        return confounders
    return confounders.with_shuffled_masks(split_ids, seed=cfg.seed)


def _confounder_figure(confounders: Confounders, ctx: StageContext):
    """One panel per class: c_i, the average mask of the class (a spatial prior)."""
    h, w = confounders.size
    panels = {
        f"{name} ({count})": center
        for name, center, count in zip(
            confounders.class_names, confounders.centers, confounders.counts, strict=True
        )
    }
    row = {"image": np.full((h, w, 3), 255, np.uint8), **panels}
    return overlay_grid(
        [row],
        ["background", *confounders.class_names],
        ctx.dir / "confounders.png",
        title=f"round {ctx.round}: confounder set C (class: training images containing it)",
    )
