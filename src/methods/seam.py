"""method=seam (Wang et al., CVPR 2020): SEAM's classifier (its recipe's cam config, trained by
the shared train_cam) -> PSA's expansion (baselines.md §A5): make_psa_labels ->
train_psa_affinity -> make_psa_pseudo_masks (-> eval_pseudo, shared).

They mirror src/methods/irnet.py (resumable per-image outputs, atomic writes, DDP barriers) and
fill the same roles, so the shared readers (eval_pseudo, train_segmenter) take their outputs
unchanged: the labels are `<dir>/ir_labels/<id>.png` (AFFINITY_LABEL_DIR) and the pseudo-masks
`<dir>/masks/<id>.png` (MASK_DIR).
The weights file has its own name, so an IRNet walk handed PSA weights (or the reverse) stops
with "missing" instead of a state-dict mismatch.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
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
from src.postprocess.crf import CRFParams
from src.postprocess.psa_labels import make_psa_label, walk_input

log = logging.getLogger(__name__)
PSA_WEIGHTS = "psa_affinity_net.pt"


# -- labels from two CRF powers ---------------------------------------------------------------
def _psa_label_job(
    job: tuple, *, low_alpha: float, high_alpha: float, crf: CRFParams, out_dir: Path
) -> None:
    image_id, image_path, cam_dir = job
    image = read_rgb(image_path)
    cam = load_cam(cam_dir, image_id)
    high_res = checked_high_res(cam, image_id, cam_dir, image.shape[:2])
    label = make_psa_label(image, high_res, cam["keys"], low_alpha, high_alpha, crf)
    save_label_png(out_dir / f"{image_id}.png", label)


def make_psa_labels(ctx: StageContext) -> StageResult:
    """Confident fg (low-α CRF) / bg (high-α CRF) / unsure labels from the CAMs; sharded over
    the ranks, each with its share of the node's process pool."""
    cfg = ctx.cfg
    opts = cfg.affinity.psa_label
    with ctx.settle():
        dataset = build_dataset(cfg.data, cfg.data.train_split)
        crf = CRFParams.from_config(opts.crf, "affinity.psa_label.crf")
    job = partial(
        _psa_label_job,
        low_alpha=opts.low_alpha,
        high_alpha=opts.high_alpha,
        crf=crf,
        out_dir=ctx.dir / AFFINITY_LABEL_DIR,
    )
    return write_labels_from_cams(
        ctx, dataset, AFFINITY_LABEL_DIR, job, "affinity.psa_label.workers"
    )


# -- the affinity network ---------------------------------------------------------------------
def train_psa_affinity(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    aff = cfg.affinity
    transform = train_transform(
        aff.crop_size,
        scale_range=aff.scale_range,  # null with resize_long null: crops only, as PSA
        resize_long=aff.resize_long,
        color_jitter=aff.get("color_jitter"),
        mean=cfg.data.mean,
        std=cfg.data.std,
        extra_targets={"ir_label": "label"},
    )
    module = build_affinity_module(cfg, ctx.inputs.get("classifier"))
    metrics = fit_on_affinity_labels(ctx, module, transform, PSA_WEIGHTS)
    return StageResult(metrics=metrics, artifacts=[PSA_WEIGHTS])


# -- random walk -> pseudo-masks ----------------------------------------------------------------
class WithWalkCams(Dataset):
    """Adds each image's walk input (psa_labels.walk_input of its high-res CAMs: background
    (1 − max)^α first, pooled to the stride grid) and class keys to the sample."""

    def __init__(self, dataset, cam_dir: Path, alpha: float, stride: int):
        self.dataset, self.cam_dir, self.alpha, self.stride = dataset, cam_dir, alpha, stride

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        cam = load_cam(self.cam_dir, sample["id"])
        size = tuple(int(s) for s in sample["size"])
        high_res = checked_high_res(cam, sample["id"], self.cam_dir, size)
        sample["cam"] = walk_input(high_res, self.alpha, self.stride)
        sample["keys"] = cam["keys"].astype(np.int64)
        return sample


def make_psa_pseudo_masks(ctx: StageContext) -> StageResult:
    module = load_trained_affinity(ctx, PSA_WEIGHTS, "train_psa_affinity")
    cam_dir = ctx.inputs["cams"] / CAM_DIR
    return walk_to_pseudo_masks(
        ctx,
        module,
        lambda dataset: WithWalkCams(
            dataset, cam_dir, alpha=module.hparams.bg_alpha, stride=module.net.output_stride
        ),
    )


# -- what the method declares (src/methods/__init__.py) ---------------------------------------
# What each stage's output depends on besides its inputs (src/pipeline/stages/keys.py). Not
# hashed: psa_label.workers and inference_batch_size (the same result for any value).
_PSA_LABELS = (
    *TRAIN_IMAGES,
    "affinity.psa_label.low_alpha",
    "affinity.psa_label.high_alpha",
    "affinity.psa_label.crf",
)
_PSA_NET = (
    *CAM_NET,
    "affinity.backbone_init",
    "affinity.backbone",
    "affinity.net",
    "affinity.module._target_",
    "affinity.module._partial_",
)
_PSA_TRAINING = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *_PSA_NET,
    "affinity.crop_size",
    "affinity.resize_long",
    "affinity.scale_range",
    "affinity.color_jitter",
    "affinity.batch_size",
    "affinity.max_epochs",
    "affinity.module.radius",
    "affinity.module.head_lr_mult",
    "affinity.optimizer",
    "affinity.scheduler",
)
_PSA_WALK = (
    *TORCH,
    *TRAIN_IMAGES,
    *NORMALISED,
    *_PSA_NET,
    "affinity.module.radius",
    "affinity.module.beta",
    "affinity.module.logt",
    "affinity.module.bg_alpha",
)

ROLES = AFFINITY_ROLES
STAGES = [
    Stage(
        "make_psa_labels",
        make_psa_labels,
        _PSA_LABELS,
        produces="affinity_labels",
        inputs=("cams",),
    ),
    Stage(
        "train_psa_affinity",
        train_psa_affinity,
        _PSA_TRAINING,
        produces="affinity",
        # classifier: read only with affinity.backbone_init=cam (as train_affinity).
        inputs=("classifier", "affinity_labels"),
        global_batch=("affinity.batch_size",),
    ),
    Stage(
        "make_psa_pseudo_masks",
        make_psa_pseudo_masks,
        _PSA_WALK,
        produces="pseudo_masks",
        inputs=("classifier", "cams", "affinity"),
    ),
]
