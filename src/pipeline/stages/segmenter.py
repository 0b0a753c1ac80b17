"""Segmenter stages (CONTA `segmentation/` = deeplab-pytorch): train_segmenter -> predict_segmenter
-> eval_segmenter, and crf_segmenter (dense CRF on the saved logits, then scored)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, Subset

from src.callbacks.prediction_writer import SegmentationWriter
from src.callbacks.step_budget import StepBudget
from src.datamodules import build_dataset, eval_transform, train_transform
from src.datamodules.datamodule import collate_same_size, inference_loader, training_loader
from src.datamodules.palette import save_label_png
from src.datamodules.validation import read_rgb
from src.models.deeplab import (
    DeepLabV2,
    SegmenterModule,
    balanced_class_weights,
    load_segmenter,
    save_segmenter,
)
from src.pipeline.artifacts import missing_items, resume_counts
from src.pipeline.batching import batch_metrics, split_over_ranks
from src.pipeline.sharding import run_image_jobs
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.cam import load_classifier_backbone
from src.pipeline.stages.pseudo_masks import MASK_DIR, evaluate_label_dirs, label_png_loader
from src.pipeline.trainers import build_trainer
from src.postprocess.crf import CRFParams, crf_refine_logits
from src.postprocess.logits_store import decode_logits
from src.utils.errors import MissingArtifactError
from src.utils.loggers import log_figure
from src.utils.ranks import barrier
from src.utils.untrusted import Source, read_npz

log = logging.getLogger(__name__)
SEGMENTER_WEIGHTS = "segmenter.pt"
LOGITS_DIR = "logits"
WITHOUT_CRF = "segmenter"  # crf_segmenter's second folder: the masks before the CRF
LABEL_SOURCES = ("pseudo", "gt")


def segmenter_spec(cfg: DictConfig, class_names: list[str]) -> dict:
    """What a checkpoint needs to rebuild the net and preprocess images (see save_segmenter)."""
    seg = cfg.segmenter
    return {
        "backbone": OmegaConf.to_container(seg.backbone, resolve=True),
        "num_classes": int(cfg.data.num_classes),
        "class_names": list(class_names),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "scales": list(seg.module.scales),
        "rates": list(seg.rates),
    }


BACKBONE_INITS = ("pretrained", "cam")


def fresh_segmenter_net(cfg: DictConfig, cam_train_dir: Path | None) -> DeepLabV2:
    """A DeepLabV2 from cfg.segmenter whose backbone starts from `segmenter.backbone_init`:
    `pretrained` (the backbone config's own weights: ImageNet for VOC/COCO, none for synth) or
    `cam` (this round's classifier, trained on the same images with image labels only)."""
    seg = cfg.segmenter
    init = seg.backbone_init
    if init not in BACKBONE_INITS:
        raise ValueError(f"segmenter.backbone_init={init!r}: use one of {BACKBONE_INITS}")
    backbone = instantiate(seg.backbone)
    if init == "cam":
        load_classifier_backbone(backbone, cam_train_dir, "segmenter.backbone_init")
    return DeepLabV2(backbone, cfg.data.num_classes, list(seg.rates))


def build_segmenter(
    cfg: DictConfig,
    label_key: str = "mask",
    net: DeepLabV2 | None = None,
    class_weight: torch.Tensor | None = None,
) -> SegmenterModule:
    """The Lightning module around `net` (default: cfg.segmenter's DeepLabV2 with the backbone
    config's own weights; train_segmenter passes the one `segmenter.backbone_init` asks for)."""
    seg = cfg.segmenter
    if net is None:
        net = DeepLabV2(instantiate(seg.backbone), cfg.data.num_classes, list(seg.rates))
    module = instantiate(seg.module, _convert_="all")(
        net,
        cfg.data.num_classes,
        optimizer=instantiate(seg.optimizer),
        scheduler=instantiate(seg.scheduler),
        label_key=label_key,
        class_weight=class_weight,
        total_steps=seg.max_steps,
    )
    if not isinstance(module, SegmenterModule):
        raise TypeError(
            f"segmenter.module built {type(module).__name__}: the segmenter stages need a "
            "SegmenterModule (or a subclass)"
        )
    return module


def label_pixel_counts(dataset, label_key: str, num_classes: int) -> np.ndarray:
    """Pixels of each class over the training labels (ground truth, or `label_key`'s extra)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for i, image_id in enumerate(dataset.ids):
        if label_key == "mask":
            label = dataset.load_mask(i)
        else:
            label = dataset.extras[label_key](image_id, None)
        counts += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)
    return counts


def _training_labels(ctx: StageContext) -> tuple[str, dict]:
    """(label key, dataset extras): this round's pseudo-masks, or the ground truth."""
    labels = ctx.cfg.segmenter.labels
    if labels not in LABEL_SOURCES:
        raise ValueError(f"segmenter.labels={labels!r}: use one of {LABEL_SOURCES}")
    if labels == "gt":
        return "mask", {}
    if "pseudo_masks" not in ctx.inputs:
        raise MissingArtifactError(
            "segmenter.labels=pseudo trains on pseudo-masks, but make_pseudo_masks is not in "
            f"`stages` ({list(ctx.cfg.stages)}). Add the IRNet stages or set segmenter.labels=gt."
        )
    folder = ctx.inputs["pseudo_masks"] / MASK_DIR
    return "pseudo_mask", {"pseudo_mask": label_png_loader(folder, "make_pseudo_masks")}


def full_image_loader(cfg: DictConfig, splits: str | list[str], indices: list[int] | None = None):
    """Full images (no geometry) of one split, or several in order, for MSC prediction."""
    transform = eval_transform(cfg.data.mean, cfg.data.std)
    names = [splits] if isinstance(splits, str) else splits
    parts = [build_dataset(cfg.data, split, transform) for split in names]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return inference_loader(
        dataset if indices is None else Subset(dataset, indices),
        cfg.segmenter.inference.batch_size,
        cfg.num_workers,
        collate_same_size,
    )


def train_segmenter(ctx: StageContext) -> StageResult:
    """DeepLab-v2 on this round's pseudo-masks (or the ground truth), validated on val GT."""
    cfg, seg = ctx.cfg, ctx.cfg.segmenter
    label_key, extras = _training_labels(ctx)
    transform = train_transform(
        seg.crop_size,
        mean=cfg.data.mean,
        std=cfg.data.std,
        scale_choices=list(seg.scale_choices),
        extra_targets={k: "label" for k in extras},
    )
    dataset = build_dataset(cfg.data, cfg.data.train_split, transform, extras=extras)
    net = fresh_segmenter_net(cfg, ctx.inputs.get("classifier"))
    counts = label_pixel_counts(dataset, label_key, cfg.data.num_classes)
    class_weight = balanced_class_weights(counts, seg.class_balance)
    log.info("train_segmenter: class weights %s", np.round(class_weight.numpy(), 2).tolist())
    module = build_segmenter(cfg, label_key, net, class_weight)
    trainer = build_trainer(
        cfg,
        ctx.dir,
        ctx.loggers,
        training=True,
        callbacks=[StepBudget(seg.max_steps)],  # not max_steps: see callbacks/step_budget.py
        max_steps=-1,
        max_epochs=-1,
        check_val_every_n_epoch=seg.val_every_n_epochs,
    )
    share = split_over_ranks(
        trainer, seg.batch_size, "segmenter.batch_size", seg.accumulate_grad_batches
    )
    train_loader = training_loader(dataset, share.per_rank, cfg.num_workers)
    trainer.fit(
        module,
        train_dataloaders=train_loader,
        val_dataloaders=full_image_loader(cfg, cfg.data.val_split),
        ckpt_path=ctx.checkpoint_to_resume(),
        weights_only=True,
    )
    if trainer.is_global_zero:
        spec = segmenter_spec(cfg, list(dataset.class_names))
        save_segmenter(ctx.dir / SEGMENTER_WEIGHTS, module.net, spec)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["labels"] = seg.labels
    metrics["resume"] = ctx.training_resume(trainer)
    metrics.update(batch_metrics(trainer, share))
    metrics["class_weight"] = [round(float(w), 4) for w in class_weight]
    return StageResult(metrics=metrics, artifacts=[SEGMENTER_WEIGHTS])


def load_trained_segmenter(cfg: DictConfig, train_dir: Path) -> SegmenterModule:
    net, spec = load_segmenter(train_dir / SEGMENTER_WEIGHTS)
    if spec["num_classes"] != cfg.data.num_classes:
        raise MissingArtifactError(
            f"{train_dir / SEGMENTER_WEIGHTS} predicts {spec['num_classes']} classes but "
            f"data.num_classes={cfg.data.num_classes}: it belongs to another data set"
        )
    return build_segmenter(cfg, net=net)  # no fresh backbone (and no weight download)


def _missing_ids(folder: Path, ids: list[str], suffix: str) -> list[int]:
    """Resume: the images still to do; the files an interrupted attempt wrote are complete (they
    are written atomically, see missing_items) and are reused."""
    return missing_items(ids, (folder, suffix))


def predict_segmenter(ctx: StageContext) -> StageResult:
    """MSC predictions on the val split: label PNGs + stride-8 logits for the CRF (resumable)."""
    cfg = ctx.cfg
    split = cfg.data.val_split
    module = load_trained_segmenter(cfg, ctx.inputs["segmenter"])
    module.predict_logits = True
    ids = build_dataset(cfg.data, split).ids
    mask_dir, logits_dir = ctx.dir / MASK_DIR, ctx.dir / LOGITS_DIR
    # An image is done when its mask and its logits are both there (the writer puts the logits
    # first, so a mask implies them; both are checked anyway).
    outputs = ((mask_dir, ".png"), (logits_dir, ".npz"))
    todo = missing_items(ids, *outputs)
    barrier()  # every rank has listed the same todo before any rank writes
    log.info("predict_segmenter: %d of %d %s images", len(todo), len(ids), split)
    if todo:
        inference = cfg.segmenter.inference
        writer = SegmentationWriter(
            mask_dir, logits_dir, inference.logits_dtype, inference.logits_min_prob
        )
        trainer = build_trainer(cfg, ctx.dir, [], training=False, callbacks=[writer])
        trainer.predict(
            module, dataloaders=full_image_loader(cfg, split, todo), return_predictions=False
        )
    barrier()  # every rank's shard is on disk before the count
    return StageResult(
        metrics={"images": len(ids), "split": split, "resume": resume_counts(ids, todo, *outputs)},
        artifacts=[MASK_DIR, LOGITS_DIR],
    )


def _score(
    ctx: StageContext,
    folder: Path,
    name: str,
    prefix: str,
    title: str,
    indices: list[int] | None = None,
    without_crf: Path | None = None,
) -> StageResult:
    """The `prefix` results row of the label PNGs in `folder` on the val split (or its images
    `indices`), with the masks `without_crf` scored on the same images alongside."""
    cfg = ctx.cfg
    dirs = {name: folder} | ({WITHOUT_CRF: without_crf} if without_crf is not None else {})
    scores, figure = evaluate_label_dirs(
        ctx, cfg.data.val_split, dirs, ctx.dir / f"{prefix}.png", title=title, indices=indices
    )
    log_figure(ctx.loggers, f"{prefix}/overlays", figure)
    s = scores[name]
    results = {
        "miou": s["miou"],
        "errors": s["errors"],
        "per_class_iou": s["per_class_iou"],
        "split": cfg.data.val_split,
        **({"context_leakage": s["context_leakage"]} if "context_leakage" in s else {}),
    }
    if without_crf is not None:
        results["without_crf_miou"] = scores[WITHOUT_CRF]["miou"]
    return StageResult(metrics=results, artifacts=[f"{prefix}.png"], results=results, prefix=prefix)


def eval_segmenter(ctx: StageContext) -> StageResult:
    folder = ctx.inputs["segmentation"] / MASK_DIR
    title = f"round {ctx.round}: segmenter on {ctx.cfg.data.val_split}"
    return _score(ctx, folder, "segmenter", "seg", title)


def read_logits(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A predict_segmenter logits file: (values whose softmax is the stored probabilities
    (K, h, w), their class ids (K,)); see src/postprocess/logits_store.py."""
    if not path.is_file():
        raise MissingArtifactError(f"{path} missing: re-run predict_segmenter")
    fix = "delete it and re-run predict_segmenter (force=[predict_segmenter])"
    src = Source(path, fix, MissingArtifactError)
    kinds = {"logits": "fu", "classes": "iu", "scale": "f"}
    arrays = read_npz(src, kinds, optional=("classes", "scale"))
    return decode_logits(arrays, num_classes, src.fail)


def _crf_job(job: tuple, *, params: CRFParams, out_dir: Path, num_classes: int) -> None:
    image_id, image_path, logits_path = job
    image = read_rgb(image_path)
    logits, classes = read_logits(logits_path, num_classes)
    labels = crf_refine_logits(image, torch.from_numpy(logits), params)
    save_label_png(out_dir / f"{image_id}.png", classes[labels].astype(np.uint8))


def crf_subset(num_images: int, crf_images: Any) -> list[int]:
    """The val images `crf_segmenter` refines and scores: all of them (None), or `crf_images`
    spread evenly over the split's order, so every run and round uses the same ones."""
    if crf_images is None:
        return list(range(num_images))
    if type(crf_images) is not int or crf_images < 1:
        raise ValueError(
            f"segmenter.crf_images={crf_images!r}: expected a positive number of val images, or "
            "null for all of them"
        )
    if crf_images >= num_images:
        return list(range(num_images))
    return np.linspace(0, num_images, crf_images, endpoint=False).astype(int).tolist()


def _crf_images(ctx: StageContext) -> tuple[Any, list[int]]:
    """The val set and the indices of the images crf_segmenter refines and scores."""
    with ctx.settle():
        dataset = build_dataset(ctx.cfg.data, ctx.cfg.data.val_split)
        subset = crf_subset(len(dataset), ctx.cfg.segmenter.get("crf_images"))
    return dataset, subset


def crf_segmenter(ctx: StageContext) -> StageResult:
    """Dense CRF (deeplab-pytorch's parameters) on the saved val logits, sharded over the ranks
    and their shares of the node's process pool, then scored like eval_segmenter (`seg_crf`).
    With `segmenter.crf_images` (COCO's budget) on a fixed subset, next to the segmenter's
    masks without the CRF on the same images (`seg_crf_without_crf_miou`)."""
    cfg = ctx.cfg
    with ctx.settle():
        params = CRFParams.from_config(
            OmegaConf.to_container(cfg.segmenter.crf, resolve=True), "segmenter.crf"
        )
    dataset, subset = _crf_images(ctx)
    segmentation = ctx.inputs["segmentation"]
    out_dir = ctx.dir / MASK_DIR
    ids = [dataset.ids[i] for i in subset]
    todo = run_image_jobs(
        ctx,
        ids,
        (out_dir, ".png"),
        lambda j: (
            ids[j],
            dataset.image_paths[subset[j]],
            segmentation / LOGITS_DIR / f"{ids[j]}.npz",
        ),
        partial(_crf_job, params=params, out_dir=out_dir, num_classes=cfg.data.num_classes),
        "segmenter.crf_workers",
    )
    result = _crf_score(ctx, len(dataset), subset)
    # A new dict: result.metrics is also the results row, which keeps no resume counts.
    result.metrics = {**result.metrics, "resume": resume_counts(ids, todo, (out_dir, ".png"))}
    return result


def _crf_score(ctx: StageContext, split_images: int, subset: list[int]) -> StageResult:
    """crf_segmenter's `seg_crf` record, from the refined masks in its folder."""
    cfg = ctx.cfg
    partial_set = len(subset) < split_images
    title = f"round {ctx.round}: segmenter + CRF on {cfg.data.val_split}"
    if partial_set:
        title += f" ({len(subset)} of {split_images} images)"
    result = _score(
        ctx,
        ctx.dir / MASK_DIR,
        "segmenter + CRF",
        "seg_crf",
        title,
        indices=subset,
        without_crf=ctx.inputs["segmentation"] / MASK_DIR if partial_set else None,
    )
    result.results |= {"images": len(subset), "split_images": split_images}
    result.artifacts.append(MASK_DIR)
    return result


def rescore_crf(ctx: StageContext) -> StageResult:
    """crf_segmenter's record recomputed from its masks (a copy's, with `reuse_from`): a donor's
    CRF score is never taken on faith. Every refined mask must be there."""
    dataset, subset = _crf_images(ctx)
    ids = [dataset.ids[i] for i in subset]
    with ctx.settle():
        missing = missing_items(ids, (ctx.dir / MASK_DIR, ".png"))
        if missing:
            raise MissingArtifactError(
                f"{ctx.dir / MASK_DIR} lacks the masks of {len(missing)} images (e.g. "
                f"{ids[missing[0]]}): re-run crf_segmenter (force=[crf_segmenter])"
            )
    return _crf_score(ctx, len(dataset), subset)
