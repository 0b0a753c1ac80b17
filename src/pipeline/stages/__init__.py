"""The registry of stages the driver can run, in the order of one round."""

from src.pipeline.stage import Stage
from src.pipeline.stages.cam import eval_cams, make_cams, train_cam
from src.pipeline.stages.conta import make_confounders
from src.pipeline.stages.context import CONFOUNDER_STAGE
from src.pipeline.stages.irnet import eval_pseudo, make_ir_labels, make_pseudo_masks, train_affinity
from src.pipeline.stages.segmenter import (
    crf_segmenter,
    eval_segmenter,
    predict_segmenter,
    train_segmenter,
)

_CAM_TRAINING = (
    "seed",
    "data",
    "backbone",
    "cam.batch_size",
    "cam.max_epochs",
    "cam.crop_size",
    "cam.scale_range",
    "cam.resize_long",
    "cam.optimizer",
)
_AFFINITY_TRAINING = (
    "affinity.backbone_init",
    "affinity.edge_width",
    "affinity.dp_width",
    "affinity.crop_size",
    "affinity.scale_range",
    "affinity.batch_size",
    "affinity.max_epochs",
    "affinity.module.radius",
    "affinity.module.lr",
    "affinity.module.dp_lr_mult",
    "affinity.module.weight_decay",
    "affinity.module.momentum",
    "affinity.module.irnet_momentum_quirk",
    "affinity.module.poly_power",
)
# Classifier settings that only exist from round 1 on (round 0 is the plain baseline).
_CONTA_CLASSIFIER = (
    "conta.context",
    "conta.temperature",
    "conta.proj_dim",
    "conta.inject_at",
    "conta.post_concat_conv",
    "conta.init",
    "conta.ablate",
)
_SEGMENTER_TRAINING = (
    "data",
    "segmenter.labels",
    "segmenter.backbone",
    "segmenter.backbone_init",
    "segmenter.class_balance",
    "segmenter.rates",
    "segmenter.batch_size",
    "segmenter.accumulate_grad_batches",
    "segmenter.max_steps",
    "segmenter.crop_size",
    "segmenter.scale_choices",
    "segmenter.module",
)

# config_keys: what each stage's output depends on (besides its inputs, whose hashes chain in).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "train_cam",
            train_cam,
            _CAM_TRAINING,
            previous_inputs=(CONFOUNDER_STAGE, "train_cam"),
            round_keys=_CONTA_CLASSIFIER,
        ),
        Stage(
            "make_cams",
            make_cams,
            ("cam.inference",),
            inputs=("train_cam",),
            previous_inputs=(CONFOUNDER_STAGE,),
        ),
        Stage(
            "eval_cams",
            eval_cams,
            ("cam.eval", "data.eval_split"),
            inputs=("make_cams",),
            rank_zero_only=True,
        ),
        Stage(
            "make_ir_labels",
            make_ir_labels,
            (
                "affinity.ir_label.fg_threshold",
                "affinity.ir_label.bg_threshold",
                "affinity.ir_label.crf",
            ),
            inputs=("make_cams",),
            rank_zero_only=True,
        ),
        Stage(
            "train_affinity",
            train_affinity,
            _AFFINITY_TRAINING,
            inputs=("train_cam", "make_ir_labels"),
        ),
        Stage(
            "make_pseudo_masks",
            make_pseudo_masks,
            ("affinity.module",),
            inputs=("train_cam", "make_cams", "train_affinity"),
        ),
        Stage(
            "eval_pseudo",
            eval_pseudo,
            ("data.eval_split",),
            inputs=("make_ir_labels", "make_pseudo_masks"),
            rank_zero_only=True,
        ),
        Stage(
            "train_segmenter",
            train_segmenter,
            ("seed", *_SEGMENTER_TRAINING),
            # train_cam: read only with segmenter.backbone_init=cam.
            optional_inputs=("make_pseudo_masks", "train_cam"),
        ),
        Stage(
            "predict_segmenter",
            predict_segmenter,
            ("data.val_split", "segmenter.inference.logits_dtype"),
            inputs=("train_segmenter",),
        ),
        Stage(
            "eval_segmenter",
            eval_segmenter,
            ("data.val_split",),
            inputs=("predict_segmenter",),
            rank_zero_only=True,
        ),
        Stage(
            "crf_segmenter",
            crf_segmenter,
            ("data.val_split", "segmenter.crf"),
            inputs=("predict_segmenter",),
            rank_zero_only=True,
        ),
        Stage(
            CONFOUNDER_STAGE,
            make_confounders,
            (
                "data.train_split",
                "conta.size",
                "conta.prior",
                "conta.mask_encoding",
                "conta.context",
                "conta.c_source",
                "conta.m_source",
            ),
            inputs=("train_segmenter",),
        ),
    ]
}
