"""The shared stages, which name no method: the classifier and its CAMs, the pseudo-mask scores,
the segmenter and CONTA's confounders. Each method's own stages live in its module under
src/methods/; src/pipeline/registry.py joins both into the registry the driver runs."""

from src.pipeline.stage import Stage
from src.pipeline.stages.cam import eval_cams, make_cams, rescore_classifier, train_cam
from src.pipeline.stages.confounders import make_confounders
from src.pipeline.stages.keys import CAM_NET as _CAM_NET
from src.pipeline.stages.keys import CONTA_CLASSIFIER as _CONTA_CLASSIFIER
from src.pipeline.stages.keys import NORMALISED as _NORMALISED
from src.pipeline.stages.keys import TORCH as _TORCH
from src.pipeline.stages.keys import TRAIN_IMAGES as _TRAIN_IMAGES
from src.pipeline.stages.pseudo_masks import eval_pseudo
from src.pipeline.stages.segmenter import (
    crf_segmenter,
    eval_segmenter,
    predict_segmenter,
    rescore_crf,
    train_segmenter,
)
from src.utils.resolvers import CONFOUNDER_STAGE

# What each stage's output depends on, besides its inputs (whose digests chain in). Exact: a key
# here redoes the stage, a key missing from every list never does (tests/pipeline/test_hashes.py
# checks every leaf of the config against its own table). `data:` / `file:` keys stand for the
# content of a split / file (src/pipeline/hashing.py).

_CAM_TRAINING = (
    *_TORCH,
    *_TRAIN_IMAGES,
    *_NORMALISED,
    *_CAM_NET,
    "cam.net",
    "cam.module",
    "cam.batch_size",
    "cam.max_epochs",
    "cam.crop_size",
    "cam.scale_range",
    "cam.resize_long",
    "cam.color_jitter",
    "cam.optimizer",
    "cam.scheduler",
)
_CAM_INFERENCE = (
    *_TORCH,
    *_TRAIN_IMAGES,
    *_NORMALISED,
    *_CAM_NET,
    "cam.net",
    "cam.module._target_",  # predict_step: the method's CAM (SEAM: from cam_rv)
    "cam.inference.scales",
    "cam.inference.flip",
    "cam.inference.normalise",
    "cam.inference.store",
)
# Scored on data.eval_split; the figure shows `figure_images` of them.
_EVAL_IMAGES = ("data:eval_split", "data.format", "data.on_empty_label", "data.num_classes")
_VAL_IMAGES = ("data:val_split", "data.format", "data.on_empty_label", "data.num_classes")
_SEGMENTER_NET = (
    "data.num_classes",
    "segmenter.backbone",
    "file:segmenter.backbone.weights_path",
    "segmenter.rates",
    "segmenter.module.scales",
)
_SEGMENTER_TRAINING = (
    *_TORCH,
    *_TRAIN_IMAGES,
    *_NORMALISED,
    *_SEGMENTER_NET,
    "data.class_names",  # written into segmenter.pt
    "segmenter.labels",
    "segmenter.backbone_init",
    "segmenter.class_balance",
    "segmenter.batch_size",
    "segmenter.accumulate_grad_batches",
    "segmenter.max_steps",
    "segmenter.val_every_n_epochs",
    "segmenter.crop_size",
    "segmenter.scale_choices",
    "segmenter.module",
    "segmenter.optimizer",
    "segmenter.scheduler",
)
_SEGMENTER_INFERENCE = (*_TORCH, *_NORMALISED, *_SEGMENTER_NET)

SHARED_STAGES: list[Stage] = [
    Stage(
        "train_cam",
        train_cam,
        _CAM_TRAINING,
        produces="classifier",
        previous_inputs=("confounders", "classifier"),
        global_batch=("cam.batch_size",),
        # The diagnostics of M (alpha, spread, logit share) are part of its results.
        round_keys=(*_CONTA_CLASSIFIER, "conta.diagnostic_images"),
        rescore=rescore_classifier,  # M's diagnostics: recomputed for a copy, not taken
    ),
    Stage(
        "make_cams",
        make_cams,
        _CAM_INFERENCE,
        produces="cams",
        inputs=("classifier",),
        previous_inputs=("confounders",),
        round_keys=(*_CONTA_CLASSIFIER, "conta.figure_images"),
    ),
    Stage(
        "eval_cams",
        eval_cams,
        (*_EVAL_IMAGES, "data.class_names", "cam.eval", "figure_images"),
        inputs=("cams",),
        reuse=False,  # scores only: recomputed, never copied
    ),
    Stage(
        "eval_pseudo",
        eval_pseudo,
        (*_EVAL_IMAGES, "data.class_names", "figure_images"),
        inputs=("pseudo_masks",),
        optional_inputs=("affinity_labels",),  # the affinity nets' labels are scored too
        reuse=False,  # scores only: recomputed, never copied
    ),
    Stage(
        "train_segmenter",
        train_segmenter,
        _SEGMENTER_TRAINING,
        produces="segmenter",
        # classifier: read only with segmenter.backbone_init=cam.
        optional_inputs=("pseudo_masks", "classifier"),
        global_batch=("segmenter.batch_size", "segmenter.accumulate_grad_batches"),
    ),
    Stage(
        "predict_segmenter",
        predict_segmenter,
        (
            *_SEGMENTER_INFERENCE,
            *_VAL_IMAGES,
            "segmenter.inference.logits_dtype",
            "segmenter.inference.logits_min_prob",
        ),
        produces="segmentation",
        inputs=("segmenter",),
    ),
    Stage(
        "eval_segmenter",
        eval_segmenter,
        (*_VAL_IMAGES, "data.class_names", "figure_images"),
        inputs=("segmentation",),
        reuse=False,  # scores only: recomputed, never copied
    ),
    Stage(
        "crf_segmenter",
        crf_segmenter,
        (
            *_VAL_IMAGES,
            "data.class_names",
            "segmenter.crf",
            "segmenter.crf_images",
            "figure_images",
        ),
        inputs=("segmentation",),
        rescore=rescore_crf,  # its masks copied, its score recomputed from them
    ),
    Stage(
        CONFOUNDER_STAGE,
        make_confounders,
        (
            *_SEGMENTER_INFERENCE,
            *_TRAIN_IMAGES,
            "data:val_split",  # M is built for the val images too
            "data.name",  # recorded in the confounder file, checked when read
            "conta.size",
            "conta.prior",
            "conta.mask_encoding",
            "conta.context",
            "conta.c_source",
            "conta.m_source",
        ),
        produces="confounders",
        inputs=("segmenter",),
    ),
]
