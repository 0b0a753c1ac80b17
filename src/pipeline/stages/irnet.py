"""IRNet expansion stages: make_ir_labels -> train_affinity -> make_pseudo_masks -> eval_pseudo."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset, default_collate

from src.callbacks.prediction_writer import PngPredictionWriter
from src.datamodules import build_dataset, eval_transform, train_transform
from src.datamodules.datamodule import inference_loader, training_loader
from src.datamodules.palette import read_label_png, save_label_png
from src.datamodules.validation import read_rgb
from src.evaluation.figures import overlay_grid
from src.evaluation.metrics import SegmentationMetric
from src.models.optim import momentum_of
from src.pipeline.artifacts import MissingArtifactError, missing_items, resume_counts
from src.pipeline.batching import batch_metrics, split_over_ranks
from src.pipeline.runtime import barrier, build_trainer, log_figure, run_on_rank_zero
from src.pipeline.sharding import metric_group, my_share, run_image_jobs, sum_over_ranks
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.cam import (
    CAM_DIR,
    checked_high_res,
    load_cam,
    load_classifier_backbone,
    read_weights,
)
from src.postprocess.crf import CRFParams, make_ir_label
from src.utils.weights import save_weights

log = logging.getLogger(__name__)
IR_LABEL_DIR = "ir_labels"
MASK_DIR = "masks"
AFFINITY_WEIGHTS = "affinity_net.pt"


def _missing(out_dir: Path, ids: list[str], suffix: str) -> list[int]:
    """Resume: the images still to do; the files an interrupted attempt wrote are complete (they
    are written atomically, see missing_items) and are reused."""
    return missing_items(ids, (out_dir, suffix))


# -- IR labels ----------------------------------------------------------------------------------
def _ir_label_job(job: tuple, *, fg: float, bg: float, crf: CRFParams, out_dir: Path) -> None:
    image_id, image_path, cam_dir = job
    image = read_rgb(image_path)  # the dataset's reader (clear decode errors)
    cam = load_cam(cam_dir, image_id)
    high_res = checked_high_res(cam, image_id, cam_dir, image.shape[:2])
    label = make_ir_label(
        image, high_res, cam["keys"], fg_threshold=fg, bg_threshold=bg, params=crf
    )
    save_label_png(out_dir / f"{image_id}.png", label)


def make_ir_labels(ctx: StageContext) -> StageResult:
    """Confident foreground/background from the CAMs, each refined by a dense CRF; sharded over
    the ranks, each with its share of the node's process pool."""
    cfg = ctx.cfg
    opts = cfg.affinity.ir_label
    with ctx.settle():
        dataset = build_dataset(cfg.data, cfg.data.train_split)
        crf = CRFParams.from_config(opts.crf, "affinity.ir_label.crf")
    return write_labels_from_cams(
        ctx,
        dataset,
        IR_LABEL_DIR,
        partial(
            _ir_label_job,
            fg=opts.fg_threshold,
            bg=opts.bg_threshold,
            crf=crf,
            out_dir=ctx.dir / IR_LABEL_DIR,
        ),
        "affinity.ir_label.workers",
    )


def write_labels_from_cams(
    ctx: StageContext, dataset, folder: str, job: Callable[[tuple], None], workers_key: str
) -> StageResult:
    """A label PNG per training image from its CAMs by `job((id, image path, CAM folder))`,
    sharded; its metrics: the shares of background, foreground and unsure pixels."""
    cam_dir = ctx.inputs["cams"] / CAM_DIR
    out_dir = ctx.dir / folder
    todo = run_image_jobs(
        ctx,
        dataset.ids,
        (out_dir, ".png"),
        lambda i: (dataset.ids[i], dataset.image_paths[i], cam_dir),
        job,
        workers_key,
    )
    with ctx.settle():
        counts = label_counts(out_dir, my_share(dataset.ids))
    stats = label_shares(sum_over_ranks(counts))  # also the barrier before DONE.json
    stats["resume"] = resume_counts(dataset.ids, todo, (out_dir, ".png"))
    return StageResult(metrics=stats, artifacts=[folder])


def label_counts(out_dir: Path, ids: list[str]) -> np.ndarray:
    """Background, confident foreground and unsure pixels over these images' IR labels."""
    counts = np.zeros(3, dtype=np.int64)
    for image_id in ids:
        label = read_label_png(out_dir / f"{image_id}.png")
        counts += [(label == 0).sum(), ((label > 0) & (label < 255)).sum(), (label == 255).sum()]
    return counts


def label_shares(counts: np.ndarray) -> dict:
    share = counts / max(1, counts.sum())
    return {"background": share[0], "foreground": share[1], "unsure": share[2]}


# -- affinity network -----------------------------------------------------------------------
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


def label_png_loader(folder: Path, producer: str):
    """An `extras` loader reading `folder/{id}.png` (label maps written by the `producer` stage)."""

    def load(image_id: str, size: tuple[int, int]) -> np.ndarray:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise MissingArtifactError(f"{path} missing: re-run {producer} (force=[{producer}])")
        return read_label_png(path)

    return load


def train_affinity(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    aff = cfg.affinity
    transform = train_transform(
        aff.crop_size,
        scale_range=aff.scale_range,
        mean=cfg.data.mean,
        std=cfg.data.std,
        extra_targets={"ir_label": "label"},
    )
    module = build_affinity_module(cfg, ctx.inputs.get("classifier"))
    metrics = fit_on_affinity_labels(ctx, module, transform, AFFINITY_WEIGHTS)
    return StageResult(metrics=metrics, artifacts=[AFFINITY_WEIGHTS])


def fit_on_affinity_labels(ctx: StageContext, module, transform, weights_file: str) -> dict:
    """Train an affinity module (IRNet's or PSA's) on the training images with the round's
    affinity labels as `ir_label`, save its net as `weights_file`; returns the stage metrics."""
    cfg, aff = ctx.cfg, ctx.cfg.affinity
    label_dir = ctx.inputs["affinity_labels"] / IR_LABEL_DIR
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


# -- random walk -> pseudo-masks ------------------------------------------------------------
class WithCams(Dataset):
    """Adds each image's stride-4 CAMs and class keys (from make_cams) to the sample."""

    def __init__(self, dataset, cam_dir: Path):
        self.dataset, self.cam_dir = dataset, cam_dir

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        cam = load_cam(self.cam_dir, sample["id"])
        cams = torch.from_numpy(cam["cam"])
        if not torch.isfinite(cams).all():
            raise ValueError(f"CAM of image {sample['id']!r} contains NaN/inf: re-run make_cams")
        sample["cam"], sample["keys"] = cams, cam["keys"].astype(np.int64)
        return sample


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


def make_pseudo_masks(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    module = build_affinity_module(cfg, ctx.inputs.get("classifier"))
    weights = ctx.inputs["affinity"] / AFFINITY_WEIGHTS
    if not weights.is_file():
        raise MissingArtifactError(f"{weights} missing: re-run train_affinity")
    module.net.load_state_dict(read_weights(weights, "train_affinity"))
    dataset = build_dataset(
        cfg.data, cfg.data.train_split, eval_transform(cfg.data.mean, cfg.data.std)
    )
    out_dir = ctx.dir / MASK_DIR
    todo = _missing(out_dir, dataset.ids, ".png")
    barrier()  # every rank has listed the same todo before any rank writes
    log.info("make_pseudo_masks: %d of %d images", len(todo), len(dataset))
    if todo:
        loader = inference_loader(
            Subset(WithCams(dataset, ctx.inputs["cams"] / CAM_DIR), todo),
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


# -- evaluation -----------------------------------------------------------------------------
def evaluate_label_dirs(
    ctx: StageContext,
    split: str,
    label_dirs: dict[str, Path],
    figure_path: Path,
    title: str,
    indices: list[int] | None = None,
) -> tuple[dict[str, dict], Path | None]:
    """mIoU + error decomposition (+ context leakage) of each folder of label PNGs vs ground truth,
    over the split's images (or those `indices` of it).

    All folders are scored in one pass, sharded over the ranks (the confusion counts are summed);
    rank 0's figure (None elsewhere) shows them side by side for the first images.
    """
    cfg = ctx.cfg
    with ctx.settle():
        dataset = build_dataset(cfg.data, split)
        context_names = list(getattr(dataset, "context_names", None) or []) or None
        metrics = {
            name: SegmentationMetric(
                cfg.data.num_classes,
                list(dataset.class_names),
                context_names=context_names,
                process_group=metric_group(),
            )
            for name in label_dirs
        }
        scored = list(range(len(dataset))) if indices is None else indices
        for i in my_share(scored):
            mask, context = dataset.load_mask(i), dataset.load_context(i)
            for name, folder in label_dirs.items():
                pred = _predicted_label(folder, dataset.ids[i], mask.shape)
                metrics[name].update(np.where(pred == 255, 0, pred), mask, context)
    scores = {name: m.compute() for name, m in metrics.items()}  # sums every rank's counts

    def figure() -> Path:
        rows = []
        for i in scored[: cfg.figure_images]:
            mask = dataset.load_mask(i)
            row = {"image": dataset.load_image(i)}
            row |= {
                n: _predicted_label(f, dataset.ids[i], mask.shape) for n, f in label_dirs.items()
            }
            rows.append({**row, "GT": mask})
        return overlay_grid(rows, list(dataset.class_names), figure_path, title=title)

    return scores, run_on_rank_zero(figure, f"{ctx.name}: figure")


def _predicted_label(folder: Path, image_id: str, shape: tuple[int, ...]) -> np.ndarray:
    path = folder / f"{image_id}.png"
    if not path.is_file():
        raise MissingArtifactError(f"{path} missing for image {image_id!r}")
    pred = read_label_png(path)
    if pred.shape != shape:
        raise MissingArtifactError(f"{path} is {pred.shape}, ground truth {shape}")
    return pred


def eval_pseudo(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    dirs = {"pseudo-mask": ctx.inputs["pseudo_masks"] / MASK_DIR}
    if "affinity_labels" in ctx.inputs:  # IRNet / PSA: the affinity net's labels, side by side
        dirs = {"IR label": ctx.inputs["affinity_labels"] / IR_LABEL_DIR, **dirs}
    scores, figure = evaluate_label_dirs(
        ctx,
        cfg.data.eval_split,
        dirs,
        ctx.dir / "pseudo_masks.png",
        title=f"round {ctx.round}: " + " and ".join(f"{k}s" for k in dirs),
    )
    log_figure(ctx.loggers, "pseudo/overlays", figure)
    pseudo = scores["pseudo-mask"]
    results = {
        "miou": pseudo["miou"],
        "errors": pseudo["errors"],
        "per_class_iou": pseudo["per_class_iou"],
        **({"context_leakage": pseudo["context_leakage"]} if "context_leakage" in pseudo else {}),
    }
    if "IR label" in scores:
        results["ir_label_miou"] = scores["IR label"]["miou"]
    return StageResult(
        metrics=results, artifacts=["pseudo_masks.png"], results=results, prefix="pseudo"
    )
