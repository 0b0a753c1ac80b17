"""method=irnet (Ahn et al., CVPR 2019): CAMs -> IR labels (make_ir_labels) -> inter-pixel
relations (train_affinity) -> random-walk pseudo-masks (make_pseudo_masks); the shared stages do
the rest (conf/method/irnet.yaml lists them all)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from src.datamodules import build_dataset, train_transform
from src.datamodules.palette import save_label_png
from src.datamodules.validation import read_rgb
from src.pipeline.stage import Stage, StageContext, StageResult
from src.pipeline.stages.affinity import ROLES as AFFINITY_ROLES
from src.pipeline.stages.affinity import (
    build_affinity_module,
    fit_on_affinity_labels,
    load_trained_affinity,
    walk_to_pseudo_masks,
)
from src.pipeline.stages.cam import CAM_DIR, checked_high_res, load_cam
from src.pipeline.stages.keys import CAM_NET, NORMALISED, TORCH, TRAIN_IMAGES
from src.pipeline.stages.pseudo_masks import AFFINITY_LABEL_DIR, write_labels_from_cams
from src.postprocess.crf import CRFParams, make_ir_label

log = logging.getLogger(__name__)
AFFINITY_WEIGHTS = "affinity_net.pt"


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
        AFFINITY_LABEL_DIR,
        partial(
            _ir_label_job,
            fg=opts.fg_threshold,
            bg=opts.bg_threshold,
            crf=crf,
            out_dir=ctx.dir / AFFINITY_LABEL_DIR,
        ),
        "affinity.ir_label.workers",
    )


# -- affinity network -----------------------------------------------------------------------
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


def make_pseudo_masks(ctx: StageContext) -> StageResult:
    module = load_trained_affinity(ctx, AFFINITY_WEIGHTS, "train_affinity")
    cam_dir = ctx.inputs["cams"] / CAM_DIR
    return walk_to_pseudo_masks(ctx, module, lambda dataset: WithCams(dataset, cam_dir))


# -- what the method declares (src/methods/__init__.py) ---------------------------------------
# What each stage's output depends on besides its inputs (src/pipeline/stages/keys.py). Not
# hashed: ir_label.workers and inference_batch_size (the same result for any value).
_IR_LABELS = (
    *TRAIN_IMAGES,
    "affinity.ir_label.fg_threshold",
    "affinity.ir_label.bg_threshold",
    "affinity.ir_label.crf",
)
# The module class (and how it is built) decides training and walk alike.
_AFFINITY_MODULE = ("affinity.module._target_", "affinity.module._partial_")
_AFFINITY_NET = (*CAM_NET, "affinity.backbone_init", "affinity.net", *_AFFINITY_MODULE)
_AFFINITY_TRAINING = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *_AFFINITY_NET,
    "affinity.crop_size",
    "affinity.scale_range",
    "affinity.batch_size",
    "affinity.max_epochs",
    "affinity.module.radius",
    "affinity.module.dp_lr_mult",
    "affinity.optimizer",
    "affinity.scheduler",
)
_RANDOM_WALK = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *_AFFINITY_NET,
    "affinity.module.radius",
    "affinity.module.beta",
    "affinity.module.exp_times",
    "affinity.module.walk_radius",
    "affinity.module.bg_threshold",
)

ROLES = AFFINITY_ROLES
STAGES = [
    Stage(
        "make_ir_labels",
        make_ir_labels,
        _IR_LABELS,
        produces="affinity_labels",
        inputs=("cams",),
    ),
    Stage(
        "train_affinity",
        train_affinity,
        _AFFINITY_TRAINING,
        produces="affinity",
        inputs=("classifier", "affinity_labels"),
        global_batch=("affinity.batch_size",),
    ),
    Stage(
        "make_pseudo_masks",
        make_pseudo_masks,
        _RANDOM_WALK,
        produces="pseudo_masks",
        inputs=("classifier", "cams", "affinity"),
    ),
]
