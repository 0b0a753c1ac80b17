"""Pseudo-mask files and their scoring, shared by every method: the folder names a method's
stages write (`MASK_DIR` for the `pseudo_masks` role, `AFFINITY_LABEL_DIR` for
`affinity_labels`), label PNGs written per image from the CAMs, a loader for label PNGs, and the
`eval_pseudo` stage with the mIoU scoring the segmenter stages use too."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from src.datamodules import build_dataset
from src.datamodules.palette import read_label_png
from src.evaluation.figures import overlay_grid
from src.evaluation.metrics import SegmentationMetric
from src.pipeline.artifacts import resume_counts
from src.pipeline.sharding import metric_group, my_share, run_image_jobs, sum_over_ranks
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.cam import CAM_DIR
from src.utils.errors import MissingArtifactError
from src.utils.loggers import log_figure
from src.utils.ranks import run_on_rank_zero

log = logging.getLogger(__name__)
MASK_DIR = "masks"  # <stage dir>/masks/<id>.png: pseudo-masks and segmenter predictions
# <stage dir>/ir_labels/<id>.png: the affinity_labels role (the folder keeps IRNet's name, so
# finished runs stay valid), scored beside the pseudo-masks by eval_pseudo.
AFFINITY_LABEL_DIR = "ir_labels"


def write_labels_from_cams(
    ctx: StageContext, dataset, folder: str, job: Callable[[tuple], None], workers_key: str | None
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
    """Background, confident foreground and unsure pixels over these images' labels."""
    counts = np.zeros(3, dtype=np.int64)
    for image_id in ids:
        label = read_label_png(out_dir / f"{image_id}.png")
        counts += [(label == 0).sum(), ((label > 0) & (label < 255)).sum(), (label == 255).sum()]
    return counts


def label_shares(counts: np.ndarray) -> dict:
    share = counts / max(1, counts.sum())
    return {"background": share[0], "foreground": share[1], "unsure": share[2]}


def label_png_loader(folder: Path, producer: str):
    """An `extras` loader reading `folder/{id}.png` (label maps written by the `producer` stage)."""

    def load(image_id: str, size: tuple[int, int]) -> np.ndarray:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise MissingArtifactError(f"{path} missing: re-run {producer} (force=[{producer}])")
        return read_label_png(path)

    return load


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
        dirs = {"IR label": ctx.inputs["affinity_labels"] / AFFINITY_LABEL_DIR, **dirs}
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
