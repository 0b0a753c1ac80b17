"""Classifier stages: train_cam -> make_cams -> eval_cams (IRNet steps 1-3)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from src.callbacks.prediction_writer import NpzPredictionWriter
from src.datamodules import WSSSDataModule, build_dataset, eval_transform
from src.datamodules.datamodule import collate_same_size
from src.evaluation.cam import ThresholdSweep, cam_to_label
from src.evaluation.figures import overlay_grid
from src.models.cam import CAMClassifier, CAMNet
from src.pipeline.runtime import build_trainer, log_figure
from src.pipeline.stage import StageContext, StageResult
from src.utils.io import atomic_torch_save

log = logging.getLogger(__name__)
WEIGHTS_FILE = "cam_net.pt"
CAM_DIR = "cams"


class MissingArtifactError(FileNotFoundError):
    pass


def build_cam_classifier(cfg: DictConfig) -> CAMClassifier:
    net = CAMNet(instantiate(cfg.backbone), num_classes=cfg.data.num_classes - 1)
    return CAMClassifier(
        net, **cfg.cam.optimizer, scales=list(cfg.cam.inference.scales), flip=cfg.cam.inference.flip
    )


def train_cam(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    datamodule = WSSSDataModule(
        cfg.data,
        train_split=cfg.data.train_split,
        val_split=cfg.data.val_split,
        batch_size=cfg.cam.batch_size,
        num_workers=cfg.num_workers,
        crop_size=cfg.cam.crop_size,
        scale_range=cfg.cam.scale_range,
        resize_long=cfg.cam.resize_long,
    )
    module = build_cam_classifier(cfg)
    trainer = build_trainer(cfg, ctx.dir, ctx.loggers, training=True, max_epochs=cfg.cam.max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.checkpoint_to_resume())
    if trainer.is_global_zero:
        atomic_torch_save(ctx.dir / WEIGHTS_FILE, module.net.state_dict())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["momentum"] = module.effective_momentum
    return StageResult(metrics=metrics, artifacts=[WEIGHTS_FILE])


def load_cam_classifier(cfg: DictConfig, train_dir: Path) -> CAMClassifier:
    weights = train_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingArtifactError(
            f"{weights} is missing: re-run the train_cam stage of this round"
        )
    module = build_cam_classifier(cfg)
    module.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return module


def make_cams(ctx: StageContext) -> StageResult:
    """Multi-scale + flip CAMs for every training image, one .npz per image (resumable)."""
    cfg = ctx.cfg
    module = load_cam_classifier(cfg, ctx.inputs["train_cam"])
    out_dir = ctx.dir / CAM_DIR
    dataset = build_dataset(
        cfg.data, cfg.data.train_split, eval_transform(cfg.data.mean, cfg.data.std)
    )
    todo = [
        i for i, image_id in enumerate(dataset.ids) if not (out_dir / f"{image_id}.npz").is_file()
    ]
    log.info("make_cams: %d of %d images to do", len(todo), len(dataset))
    if todo:
        loader = DataLoader(
            Subset(dataset, todo),
            batch_size=cfg.cam.inference.batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate_same_size,
        )
        writer = NpzPredictionWriter(out_dir)
        trainer = build_trainer(cfg, ctx.dir, [], training=False, callbacks=[writer])
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    return StageResult(metrics={"images": len(dataset)}, artifacts=[CAM_DIR])


def load_cam(cam_dir: Path, image_id: str) -> dict[str, np.ndarray]:
    path = cam_dir / f"{image_id}.npz"
    if not path.is_file():
        raise MissingArtifactError(
            f"CAM file {path} for image {image_id!r} is missing: the make_cams stage did not cover "
            f"this id (was data.eval_split changed?). Re-run with force=[make_cams]."
        )
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def eval_cams(ctx: StageContext) -> StageResult:
    """CAM mIoU on the evaluation split with a background-threshold sweep, errors and leakage."""
    cfg = ctx.cfg
    cam_dir = ctx.inputs["make_cams"] / CAM_DIR
    dataset = build_dataset(cfg.data, cfg.data.eval_split)
    thresholds = [float(t) for t in cfg.cam.eval.sweep]
    sweep = ThresholdSweep(
        thresholds,
        num_classes=cfg.data.num_classes,
        class_names=list(dataset.class_names),
        configured_threshold=cfg.cam.eval.bg_threshold,
        context_names=_context_names(dataset),
        sync_on_compute=False,  # scored on rank 0 alone; a sync would wait for idle ranks
    )
    figure_rows = []
    for i, image_id in enumerate(dataset.ids):
        cam = load_cam(cam_dir, image_id)
        high_res = cam["high_res"].astype(np.float32)
        mask = dataset.load_mask(i)
        if high_res.shape[1:] != mask.shape:
            raise MissingArtifactError(
                f"CAM {cam_dir / image_id}.npz has size {high_res.shape[1:]} but the mask is "
                f"{mask.shape}: the CAMs come from another data set; re-run make_cams"
            )
        context = dataset.load_context(i)
        sweep.update(high_res, cam["keys"], mask, context)
        if len(figure_rows) < cfg.figure_images:
            figure_rows.append(
                {
                    "image": dataset.load_image(i),
                    "CAM": high_res.max(axis=0) if len(high_res) else np.zeros(mask.shape),
                    "CAM label": cam_to_label(high_res, cam["keys"], cfg.cam.eval.bg_threshold),
                    "GT": mask,
                }
            )
    summary = sweep.compute()
    figure = overlay_grid(
        figure_rows,
        list(dataset.class_names),
        ctx.dir / "cams.png",
        title=f"round {ctx.round}: CAMs",
    )
    log_figure(ctx.loggers, "cam/overlays", figure)
    results = _cam_results(summary)
    return StageResult(metrics=results, artifacts=["cams.png"], results=results, prefix="cam")


def _context_names(dataset) -> list[str] | None:
    return list(getattr(dataset, "context_names", None) or []) or None


def _cam_results(summary: dict) -> dict:
    at = summary["at_configured"]
    return {
        "miou": at["miou"],
        "threshold": summary["configured_threshold"],
        "best_miou": summary["best_miou"],
        "best_threshold": summary["best_threshold"],
        "errors": at["errors"],
        "per_class_iou": at["per_class_iou"],
        **({"context_leakage": at["context_leakage"]} if "context_leakage" in at else {}),
        "sweep": dict(zip(summary["thresholds"], summary["miou_per_threshold"], strict=True)),
    }
