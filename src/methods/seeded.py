"""method=sec and method=dsrg (baselines.md A2-A4, A8): one family, the same three stages; the
recipe (seeded/sec_<scale> or seeded/dsrg_<scale>: seeded.module) says which net trains.

make_cues          cues: foreground from this round's CAMs (> 0.2 x max), background from the
                   classifier's gradient saliency (the 10 % least salient cells): no external
                   saliency model, for SEC and DSRG alike (DSRG's DRFI cues are not used).
train_seeded       seeded_net: SEC's or DSRG's net trained on the cues (seeded.module says which).
make_seeded_masks  pseudo_masks: the net's predictions on the training images (seeded.masks: over
                   all classes as SEC demo.py / DSRG test-ms.py, or kept to each image's classes;
                   one input scale, or DSRG's 241/321/401), refined by the full-resolution dense
                   CRF (the labels DSRG's "retrain" step and CONTA's SEC row use), then
                   DeepLab-v2 is retrained on them.

Per-image stages are sharded over the ranks and resumable (one file per image, atomic writes).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from src.callbacks.prediction_writer import NpzPredictionWriter
from src.callbacks.step_budget import StepBudget
from src.datamodules import build_dataset
from src.datamodules.datamodule import inference_loader, training_loader
from src.datamodules.palette import save_label_png
from src.datamodules.transforms import SegTransform, load_frame
from src.datamodules.validation import read_rgb
from src.evaluation.figures import cue_figure
from src.models.cam import strided_size
from src.models.seeded_module import SeededModule, upsample_probs
from src.pipeline.artifacts import missing_items, resume_counts
from src.pipeline.batching import batch_metrics, split_over_ranks
from src.pipeline.sharding import gather_over_ranks, my_share, run_image_jobs
from src.pipeline.stage import Stage, StageContext, StageResult
from src.pipeline.stages.cam import (
    CAM_DIR,
    load_cam,
    load_cam_classifier,
    load_classifier_backbone,
    read_weights,
)
from src.pipeline.stages.context import classifier_inference_set, previous_confounders
from src.pipeline.stages.keys import CAM_NET, CONTA_CLASSIFIER, NORMALISED, TORCH, TRAIN_IMAGES
from src.pipeline.stages.pseudo_masks import MASK_DIR
from src.pipeline.trainers import build_trainer
from src.postprocess.crf import CRFParams, crf_probs
from src.postprocess.cues import (
    CueStats,
    assemble_cues,
    background_cues,
    foreground_cues,
    gradient_saliency,
    read_cues,
    write_cues,
)
from src.utils.errors import MissingArtifactError
from src.utils.loggers import log_figure
from src.utils.ranks import barrier, global_rank, run_on_rank_zero
from src.utils.untrusted import Source, read_npz
from src.utils.weights import save_weights

log = logging.getLogger(__name__)
CUE_DIR = "cues"
PROBS_DIR = "probs"
SEEDED_WEIGHTS = "seeded_net.pt"
OUTPUT_STRIDE = 8  # VGG16Backbone (DeepLab-LargeFOV) and the OS-8 ResNets alike
PROB_ARRAYS = {"keys": "iu", "probs": "f"}


def cue_grid(cfg: DictConfig) -> tuple[int, int]:
    """The net's output grid for a `seeded.input_size` square input (41 x 41 for SEC's 321)."""
    size = int(cfg.seeded.input_size)
    return strided_size((size, size), OUTPUT_STRIDE)


def _class_ids(label: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.asarray(label) > 0.5) + 1


# -- cues ---------------------------------------------------------------------------------------
def make_cues(ctx: StageContext) -> StageResult:
    cfg, opts = ctx.cfg, ctx.cfg.seeded.cues
    confounders = previous_confounders(ctx)
    net = load_cam_classifier(cfg, ctx.inputs["classifier"], confounders).net
    dataset = classifier_inference_set(cfg, confounders)
    cam_dir, out_dir = ctx.inputs["cams"] / CAM_DIR, ctx.dir / CUE_DIR
    grid, num_classes = cue_grid(cfg), int(cfg.data.num_classes)
    todo = missing_items(dataset.ids, (out_dir, ".npz"))
    barrier()  # every rank has listed the same todo before any rank writes
    log.info("make_cues: %d of %d images, grid %s", len(todo), len(dataset), grid)
    with ctx.settle():
        for i in my_share(todo):
            sample = dataset[i]
            cam = load_cam(cam_dir, sample["id"])
            fg = foreground_cues(
                cam["high_res"],
                cam["keys"],
                grid,
                num_classes,
                threshold=opts.fg_threshold,
            )
            saliency = gradient_saliency(
                net,
                sample["image"],
                grid,
                stage=opts.saliency_stage,
                context_mask=sample.get("context_mask"),
                frame=sample.get("frame"),
                classes=(_class_ids(sample["label"]) - 1).tolist(),  # the image's own logits
            )
            bg = background_cues(saliency, opts.bg_fraction)
            write_cues(
                out_dir / f"{sample['id']}.npz",
                assemble_cues(fg, bg, opts.overlap),
                _class_ids(sample["label"]),
                data_name=cfg.data.name,
                num_classes=num_classes,
            )
    barrier()  # every rank's shard is on disk before the count
    metrics = {"resume": resume_counts(dataset.ids, todo, (out_dir, ".npz"))}
    summary = _cue_summary(ctx, out_dir, grid)
    if global_rank() == 0:
        metrics.update(summary)
    return StageResult(metrics=metrics, artifacts=[CUE_DIR])


def _cue_summary(ctx: StageContext, out_dir: Path, grid: tuple[int, int]) -> dict:
    """Cue shares and the (image, class) pairs whose foreground cue is empty: counted and
    reported (those classes then train from the expansion / growth terms only), plus rank 0's
    figure. Each rank reads its share of the cue files; the counts are joined on every rank."""
    cfg = ctx.cfg
    with ctx.settle():
        dataset = build_dataset(cfg.data, cfg.data.train_split)
        stats = CueStats()
        for i in my_share(range(len(dataset))):
            ids = _class_ids(dataset.labels[i])
            cues = _read_cues(cfg, out_dir, dataset.ids[i], grid, ids)
            fg = cues.copy()
            fg[0] = False
            stats.update(dataset.ids[i], fg, cues[0], ids)
    summary = joined_cue_stats(gather_over_ranks(stats), dataset.ids).summary()
    if summary["empty_foreground"] and global_rank() == 0:
        log.warning(
            "make_cues: %d of %d labelled (image, class) pairs have no foreground cue, e.g. %s",
            summary["empty_foreground"],
            summary["labelled_pairs"],
            summary["empty_foreground_examples"][:3],
        )

    def figure() -> Path | None:
        shown = range(min(cfg.figure_images, len(dataset)))
        if not shown:
            return None
        return cue_figure(
            [read_rgb(dataset.image_paths[i]) for i in shown],
            [_read_cues(cfg, out_dir, dataset.ids[i], grid) for i in shown],
            list(dataset.class_names),
            ctx.dir / "cues.png",
            title=f"round {ctx.round}: localization cues ({grid[0]} x {grid[1]})",
        )

    path = run_on_rank_zero(figure, f"{ctx.name}: figure")
    if path is not None:
        log_figure(ctx.loggers, "cues/overlays", path)
    return summary


def joined_cue_stats(shards: list[CueStats], ids: list[str]) -> CueStats:
    """The ranks' CueStats as one process's: counts summed, and the named examples (each rank
    keeps its own first ones) the first of all in data set order."""
    joined = CueStats(shards[0].max_examples)
    for shard in shards:
        joined.merge(shard)
    order = {image_id: i for i, image_id in enumerate(ids)}
    examples = sorted((e for s in shards for e in s.examples), key=lambda e: (order[e[0]], e[1]))
    joined.examples = examples[: joined.max_examples]
    return joined


def _read_cues(cfg: DictConfig, cue_dir: Path, image_id: str, grid, labels=None) -> np.ndarray:
    return read_cues(
        cue_dir / f"{image_id}.npz",
        data_name=cfg.data.name,
        num_classes=int(cfg.data.num_classes),
        grid=grid,
        labels=labels,
        producer="make_cues",  # named in every fix
    )


# -- the seeded net -----------------------------------------------------------------------------
def mask_scales(cfg: DictConfig) -> list[int] | None:
    """`seeded.masks.scales` as square sizes, or None (the input_size alone)."""
    scales = cfg.seeded.masks.scales
    return None if scales is None else [int(s) for s in scales]


def seeded_transform(cfg: DictConfig, train: bool) -> SegTransform:
    """SEC/DSRG input: the whole image resized to `input_size` squared (no crop); in training a
    random horizontal flip when `seeded.flip` (DSRG; SEC has none). The frame map rides along so
    the cue loader can tell a flipped sample (the cues live on the grid, not the image). At test
    time with `seeded.masks.scales` the largest of them and input_size, so that predict_step
    resizes every scale down (or not at all) from the image's closest version."""
    size = int(cfg.seeded.input_size)
    if not train and mask_scales(cfg):
        size = max(size, *mask_scales(cfg))
    geometry = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    if train and cfg.seeded.flip:
        geometry.append(A.HorizontalFlip(p=0.5))
    frame = {"frame": "float"} if train else None
    return SegTransform(geometry, cfg.data.mean, cfg.data.std, frame)


class WithCues(Dataset):
    """Adds each image's cues (C, h, w) to its sample, flipped with the image."""

    def __init__(self, dataset, cfg: DictConfig, cue_dir: Path):
        self.dataset, self.cfg, self.cue_dir = dataset, cfg, cue_dir
        self.grid = cue_grid(cfg)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        frame = sample.pop("frame")  # (3, S, S): u grows left to right unless flipped
        ids = _class_ids(sample["label"])
        cues = torch.from_numpy(_read_cues(self.cfg, self.cue_dir, sample["id"], self.grid, ids))
        sample["cues"] = cues.flip(-1) if frame[0, 0, 0] > frame[0, 0, -1] else cues
        return sample


def build_seeded_module(cfg: DictConfig, classifier_dir: Path | None) -> SeededModule:
    """`seeded.net` on `seeded.backbone` (VGG-16 for the paper, the classifier's ResNet on the
    synthetic set), inside `seeded.module` (SECModule / DSRGModule) with its optimiser."""
    sd = cfg.seeded
    backbone = instantiate(sd.backbone)
    if sd.backbone_init == "cam":
        load_classifier_backbone(backbone, classifier_dir, "seeded.backbone_init")
    elif sd.backbone_init != "pretrained":
        raise ValueError(f"seeded.backbone_init={sd.backbone_init!r}: use pretrained|cam")
    net = instantiate(sd.net, _convert_="all")(backbone, cfg.data.num_classes)
    module = instantiate(sd.module, _convert_="all")(
        net,
        cfg.data.num_classes,
        optimizer=instantiate(sd.optimizer),
        scheduler=instantiate(sd.scheduler),
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        total_steps=int(sd.max_steps),
        crf_workers=int(sd.train_crf_workers),
    )
    if not isinstance(module, SeededModule):
        raise TypeError(
            f"seeded.module built {type(module).__name__}: the seeded stages need a "
            "SeededModule (SECModule or DSRGModule)"
        )
    return module


def train_seeded(ctx: StageContext) -> StageResult:
    cfg, sd = ctx.cfg, ctx.cfg.seeded
    base = build_dataset(
        cfg.data,
        cfg.data.train_split,
        seeded_transform(cfg, train=True),
        extras={"frame": load_frame},
    )
    dataset = WithCues(base, cfg, ctx.inputs["cues"] / CUE_DIR)
    module = build_seeded_module(cfg, ctx.inputs.get("classifier"))
    trainer = build_trainer(
        cfg,
        ctx.dir,
        ctx.loggers,
        training=True,
        callbacks=[StepBudget(sd.max_steps)],  # an epoch-based fit ended by the step budget
        max_steps=-1,
        max_epochs=-1,
        limit_val_batches=0,
    )
    share = split_over_ranks(trainer, sd.batch_size, "seeded.batch_size")
    loader = training_loader(dataset, share.per_rank, cfg.num_workers)
    trainer.fit(
        module, train_dataloaders=loader, ckpt_path=ctx.checkpoint_to_resume(), weights_only=True
    )
    if trainer.is_global_zero:
        save_weights(ctx.dir / SEEDED_WEIGHTS, module.net.state_dict())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["resume"] = ctx.training_resume(trainer)
    metrics.update(batch_metrics(trainer, share))
    return StageResult(metrics=metrics, artifacts=[SEEDED_WEIGHTS])


# -- pseudo-masks -------------------------------------------------------------------------------
def read_probs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, probs) of one image as predict_step wrote them: keys background first, then class
    ids < 256 (palette PNGs), one probability plane each, finite and non-negative."""
    fix = "delete it and re-run make_seeded_masks (force=[make_seeded_masks])"
    src = Source(path, fix, MissingArtifactError)
    arrays = read_npz(src, PROB_ARRAYS)
    keys, probs = arrays["keys"].astype(np.int64), arrays["probs"].astype(np.float32)
    if keys.ndim != 1 or probs.ndim != 3 or len(keys) != len(probs) or not len(keys):
        src.fail(f"keys {keys.shape} and probs {probs.shape} do not fit: one plane per key")
    if keys[0] != 0 or keys.min() < 0 or keys.max() > 255 or len(set(keys.tolist())) != len(keys):
        src.fail(f"keys {keys.tolist()} are not background first, then distinct ids < 256")
    if not np.isfinite(probs).all() or probs.min() < 0 or not (probs.sum(axis=0) > 0).all():
        src.fail("probs hold NaN, inf, negative values or an all-zero pixel")
    return keys, probs


def _crf_mask_job(job: tuple, *, params: CRFParams, out_dir: Path) -> None:
    image_id, image_path, probs_path = job
    image = read_rgb(image_path)
    if not Path(probs_path).is_file():
        raise MissingArtifactError(f"{probs_path} missing: re-run make_seeded_masks")
    keys, probs = read_probs(Path(probs_path))
    probs = upsample_probs(probs, image.shape[:2])
    probs /= probs.sum(axis=0, keepdims=True)
    q = crf_probs(image, probs, params)
    save_label_png(out_dir / f"{image_id}.png", keys[q.argmax(axis=0)].astype(np.uint8))


def make_seeded_masks(ctx: StageContext) -> StageResult:
    cfg, sd = ctx.cfg, ctx.cfg.seeded
    module = build_seeded_module(cfg, ctx.inputs.get("classifier"))
    weights = ctx.inputs["seeded_net"] / SEEDED_WEIGHTS
    if not weights.is_file():
        raise MissingArtifactError(f"{weights} missing: re-run train_seeded")
    module.net.load_state_dict(read_weights(weights, "train_seeded"))
    module.set_prediction(sd.masks.classes, mask_scales(cfg), grid=cue_grid(cfg))
    dataset = build_dataset(cfg.data, cfg.data.train_split, seeded_transform(cfg, train=False))
    probs_dir, out_dir = ctx.dir / PROBS_DIR, ctx.dir / MASK_DIR
    todo = missing_items(dataset.ids, (probs_dir, ".npz"))
    barrier()
    log.info("make_seeded_masks: predicting %d of %d images", len(todo), len(dataset))
    if todo:
        loader = inference_loader(Subset(dataset, todo), sd.inference_batch_size, cfg.num_workers)
        trainer = build_trainer(
            cfg, ctx.dir, [], training=False, callbacks=[NpzPredictionWriter(probs_dir)]
        )
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    barrier()
    # The CRF (pydensecrf, CPU) per image, sharded over the ranks and their process pools.
    with ctx.settle():
        params = CRFParams.from_config(
            OmegaConf.to_container(sd.test_crf, resolve=True), "seeded.test_crf"
        )
    crf_todo = run_image_jobs(
        ctx,
        dataset.ids,
        (out_dir, ".png"),
        lambda i: (dataset.ids[i], dataset.image_paths[i], probs_dir / f"{dataset.ids[i]}.npz"),
        partial(_crf_mask_job, params=params, out_dir=out_dir),
        "seeded.crf_workers",
    )
    resume = resume_counts(dataset.ids, crf_todo, (out_dir, ".png"))
    return StageResult(metrics={"images": len(dataset), "resume": resume}, artifacts=[MASK_DIR])


# -- what the family declares (src/methods/__init__.py) ------------------------------------------
_CUES = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *CAM_NET,
    "cam.net",
    "data.name",  # written into every cue file
    "seeded.input_size",
    "seeded.cues.fg_threshold",
    "seeded.cues.bg_fraction",
    "seeded.cues.saliency_stage",
    "seeded.cues.overlap",
)
_SEEDED_NET = ("data.num_classes", "seeded.backbone", "seeded.backbone_init", "seeded.net")
_SEEDED_TRAINING = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *CAM_NET,
    *_SEEDED_NET,
    "seeded.input_size",
    "seeded.flip",
    "seeded.batch_size",
    "seeded.max_steps",
    "seeded.module",
    "seeded.optimizer",
    "seeded.scheduler",
)
_SEEDED_MASKS = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *CAM_NET,
    *_SEEDED_NET,
    "seeded.input_size",
    "seeded.module._target_",
    "seeded.masks",
    "seeded.test_crf",
)

# The roles only this family's stages produce and read.
ROLES = {
    "cues": "SEC/DSRG localization cues on the seeded net's output grid (cues/<id>.npz)",
    "seeded_net": "the trained SEC or DSRG network (seeded_net.pt)",
}
STAGES = [
    Stage(
        "make_cues",
        make_cues,
        _CUES,
        produces="cues",
        inputs=("classifier", "cams"),
        previous_inputs=("confounders",),  # a CONTA classifier reads its context to backprop
        round_keys=CONTA_CLASSIFIER,
    ),
    Stage(
        "train_seeded",
        train_seeded,
        _SEEDED_TRAINING,
        produces="seeded_net",
        inputs=("cues",),
        optional_inputs=("classifier",),  # read only with seeded.backbone_init=cam
        global_batch=("seeded.batch_size",),
    ),
    Stage(
        "make_seeded_masks",
        make_seeded_masks,
        _SEEDED_MASKS,
        produces="pseudo_masks",
        inputs=("seeded_net",),
        optional_inputs=("classifier",),
    ),
]
