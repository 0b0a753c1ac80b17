"""DeepLab-v2 segmenter (CONTA `segmentation/` = kazuto1011/deeplab-pytorch, method-spec section 3).

ResNet backbone at output stride 8 (strides (2, 2, 1, 1), dilations (1, 1, 2, 4), frozen BN) + ASPP
(four parallel dilated 3x3 convs, outputs summed). Training uses deeplab-pytorch's MSC: logits at
every input scale plus their pixel-wise max, cross-entropy summed over all of them; evaluation and
prediction use the max only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src.evaluation.metrics import SegmentationMetric
from src.models.backbone import ResNetBackbone
from src.models.optim import OptimizerFactory, PolyLR, SchedulerFactory, optimizer_config, sgd
from src.utils.io import atomic_torch_save
from src.utils.untrusted import (
    Source,
    UntrustedFileError,
    check_fields,
    read_torch,
    tensor_state_dict,
)
from src.utils.weights import tensor_digest

log = logging.getLogger(__name__)
SEGMENTER_FORMAT = "wsss-segmenter/1"
SPEC_SCHEMA = {
    "backbone": dict,  # checked against BACKBONES
    "num_classes": int,
    "class_names": list[str],
    "mean": list[float],
    "std": list[float],
    "scales": list[float],
    "rates": list[int],
}
SPEC_KEYS = tuple(SPEC_SCHEMA)
# The only classes a checkpoint may name, and the keywords (with their kinds) it may pass; a
# test keeps the keywords in step with the class signature.
BACKBONES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "src.models.backbone.ResNetBackbone": (
        ResNetBackbone,
        {
            "arch": str,
            "weights": str | None,
            "weights_path": str | None,
            "strides": list[int],
            "dilations": list[int],
            "norm": str,
            "frozen_stages": int,
        },
    ),
}
SEGMENTER_FIX = (
    "use the segmenter.pt written by the train_segmenter stage (re-run that stage to get a "
    "fresh one); never load a checkpoint from an untrusted source"
)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab-v2: parallel 3x3 convs, dilation = padding = rate,
    each in_channels -> num_classes with bias; the branch outputs are summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.constant_(conv.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(nn.Module):
    """Backbone (expected output stride 8) -> ASPP; forward gives logits at the backbone stride."""

    def __init__(
        self, backbone: ResNetBackbone, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspp = ASPP(backbone.out_channels[-1], num_classes, rates)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x))


def msc_logits(
    net: nn.Module,
    x: torch.Tensor,
    scales: Sequence[float] = (1.0, 0.75, 0.5),
    training: bool = False,
) -> list[torch.Tensor] | torch.Tensor:
    """deeplab-pytorch MSC. Every scale's input is resized bilinearly (align_corners=False); the
    pixel-wise max is taken after upsampling every logit (bilinear) to the scale-1.0 logit's size
    (the first scale's when 1.0 is absent).

    training: [logit for each scale in `scales` order] + [max]; otherwise the max only.
    """
    logits = []
    for scale in scales:
        xs = (
            x
            if scale == 1.0
            else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        logits.append(net(xs))
    ref = list(scales).index(1.0) if 1.0 in scales else 0
    size = logits[ref].shape[-2:]
    upsampled = [
        lg
        if lg.shape[-2:] == size
        else F.interpolate(lg, size=size, mode="bilinear", align_corners=False)
        for lg in logits
    ]
    fused = torch.stack(upsampled).amax(dim=0)
    return logits + [fused] if training else fused


def msc_loss(
    logits_list: Sequence[torch.Tensor],
    target: torch.Tensor,
    ignore_index: int = 255,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of every MSC output against the label map (B, H, W) resized to its size with
    nearest neighbour, summed over the outputs (deeplab-pytorch); `class_weight` (C,) weighs
    each pixel by its class (see `balanced_class_weights`)."""
    target = target.long()
    total = 0.0
    for logit in logits_list:
        size = logit.shape[-2:]
        t = target
        if t.shape[-2:] != size:
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0].long()
        total = total + F.cross_entropy(logit, t, weight=class_weight, ignore_index=ignore_index)
    return total


CLASS_BALANCE = ("none", "inverse_sqrt")


def balanced_class_weights(pixel_counts: Sequence[int], mode: str = "inverse_sqrt") -> torch.Tensor:
    """Per-class loss weights from the training labels' pixel counts. `inverse_sqrt`: w_c ∝
    1/sqrt(f_c), scaled so that the average pixel keeps weight 1 (sum_c f_c w_c = 1), so the loss
    and the tuned lr keep their scale; classes without pixels get 1 (they never occur). `none`:
    all ones. Why: objects of a few % of the image let a from-scratch segmenter settle on
    background everywhere (measured on small-object sets, see the segmenter config)."""
    if mode not in CLASS_BALANCE:
        raise ValueError(f"segmenter.class_balance={mode!r}: use one of {CLASS_BALANCE}")
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if mode == "none" or counts.sum() <= 0:
        return torch.ones(len(counts), dtype=torch.float32)
    freq = counts / counts.sum()
    present = freq > 0
    weight = torch.ones_like(freq)
    weight[present] = freq[present].rsqrt()
    weight[present] /= (freq[present] * weight[present]).sum()
    return weight.float()


# deeplab-pytorch's solver: lr 2.5e-4, poly 0.9 recomputed every 10 iterations.
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    sgd, lr=2.5e-4, momentum=0.9, weight_decay=5e-4
)
DEFAULT_SCHEDULER: SchedulerFactory = functools.partial(PolyLR, power=0.9, every=10)


class SegmenterModule(L.LightningModule):
    """DeepLab-v2 training on `batch[label_key]` (pseudo-masks, or `mask` for the supervised
    bound); validation always against the ground truth `mask`; predict_step gives label maps."""

    def __init__(
        self,
        net: DeepLabV2,
        num_classes: int,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        aspp_weight_lr_mult: float = 10.0,
        aspp_bias_lr_mult: float = 20.0,
        scales: Sequence[float] = (1.0, 0.75, 0.5),
        label_key: str = "mask",
        ignore_index: int = 255,
        class_weight: Sequence[float] | None = None,
        total_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "class_weight", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # A buffer: moves with the module, saved in Lightning's checkpoint for an honest resume.
        weight = torch.ones(num_classes) if class_weight is None else torch.as_tensor(class_weight)
        self.register_buffer("class_weight", weight.float(), persistent=True)
        self.val_metric = SegmentationMetric(num_classes, ignore_index=ignore_index)
        # Set by the stage that needs them (the CRF step): stride-8 logits in predict outputs.
        self.predict_logits = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Eval-mode MSC logits (pixel-wise max over scales) at the net's output stride."""
        return msc_logits(self.net, images, self.hparams.scales, training=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = msc_logits(self.net, batch["image"], self.hparams.scales, training=True)
        loss = msc_loss(
            logits, batch[self.hparams.label_key], self.hparams.ignore_index, self.class_weight
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target = batch["mask"]
        logits = F.interpolate(
            self(batch["image"]), size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        self.val_metric.update(logits.argmax(dim=1), target)

    def on_validation_epoch_end(self) -> None:
        self.log("val/mIoU", self.val_metric.compute()["miou"], prog_bar=True)
        self.val_metric.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Label map of each image at its own size `batch["size"][i]` = (H, W). Logits are
        upsampled to the input tensor's size and cropped when the image fits inside it (batches
        padded bottom/right), else resized straight to (H, W). With `predict_logits`, the items
        also carry the stride-8 logits of the image's own extent (deeplab-pytorch saves these)."""
        images = batch["image"]
        logits = self(images)
        in_h, in_w = images.shape[-2:]
        full = F.interpolate(logits, size=(in_h, in_w), mode="bilinear", align_corners=False)
        items = []
        for i, image_id in enumerate(batch["id"]):
            h, w = (int(s) for s in batch["size"][i])
            if h <= in_h and w <= in_w:
                logit = full[i, :, :h, :w]
            else:
                logit = F.interpolate(
                    logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False
                )[0]
            item = {"id": image_id, "mask": logit.argmax(dim=0).to(torch.uint8).cpu().numpy()}
            if self.predict_logits:
                stride = self.net.output_stride
                lh, lw = -(-h // stride), -(-w // stride)  # ceil: the extent the image covers
                item["logits"] = logits[i, :, :lh, :lw].float().cpu().numpy()
            items.append(item)
        return items

    def param_groups(self) -> list[dict]:
        """deeplab-pytorch's groups: trainable backbone params (lr, wd), ASPP weights
        (lr * aspp_weight_lr_mult, wd), ASPP biases (lr * aspp_bias_lr_mult, wd 0)."""
        hp = self.hparams
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        aspp_w = [m.weight for m in self.net.aspp.branches]
        aspp_b = [m.bias for m in self.net.aspp.branches]
        groups = [
            {"params": backbone, "lr_mult": 1.0},
            {"params": aspp_w, "lr_mult": hp.aspp_weight_lr_mult},
            {"params": aspp_b, "lr_mult": hp.aspp_bias_lr_mult, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        return optimizer_config(
            self.param_groups(),
            self.optimizer_factory,
            self.scheduler_factory,
            # The stage's step budget (callbacks/step_budget.py): its fit is epoch-based.
            int(self.hparams.total_steps or self.trainer.estimated_stepping_batches),
        )


class CheckpointError(UntrustedFileError):
    """A segmenter checkpoint that is missing, unreadable or does not fit the model it describes."""


def _positive(values: Sequence[float], most: float = math.inf, count: int = 16) -> bool:
    """1..count finite numbers in (0, most]: a crafted spec must not size an allocation (MSC
    scales of 1e6 asked for petabytes)."""
    return 0 < len(values) <= count and all(math.isfinite(v) and 0 < v <= most for v in values)


# Upper bounds far above any recipe (conf/segmenter: scales <= 1, rates <= 24, dilations <= 4).
MAX_SCALE = 4.0
MAX_RATE = 64
MAX_DILATION = 16


def check_spec(spec: Any, src: Source) -> dict[str, Any]:
    """`spec` when it is a spec save_segmenter writes: known keys, plain values of the right
    types and ranges, an allow-listed backbone class with known keywords; else `src.fail`."""
    spec = check_fields(spec, SPEC_SCHEMA, src, "spec")
    backbone = spec["backbone"]
    target = backbone.get("_target_")
    if type(target) is not str or target not in BACKBONES:
        src.fail(
            f"spec['backbone']['_target_'] is {target!r}, not one of the backbones a checkpoint "
            f"may name {list(BACKBONES)}"
        )
    kwargs = {k: v for k, v in backbone.items() if k != "_target_"}
    schema = BACKBONES[target][1]
    check_fields(kwargs, schema, src, "spec['backbone']", optional=schema)
    n = spec["num_classes"]
    ranges = {
        "num_classes": (1 <= n <= 255, "in 1..255 (label maps are uint8)"),
        "class_names": (len(spec["class_names"]) == n, f"{n} names (num_classes)"),
        "mean": (len(spec["mean"]) == 3 and all(map(math.isfinite, spec["mean"])), "3 numbers"),
        "std": (len(spec["std"]) == 3 and _positive(spec["std"]), "3 positive numbers"),
        "scales": (_positive(spec["scales"], MAX_SCALE), f"1..16 numbers in (0, {MAX_SCALE}]"),
        "rates": (_positive(spec["rates"], MAX_RATE), f"1..16 integers in 1..{MAX_RATE}"),
    }
    for key, (ok, expected) in ranges.items():
        if not ok:
            src.fail(f"spec[{key!r}] is {spec[key]!r}, expected {expected}")
    bounds = {"strides": (2, "integers 1 or 2"), "dilations": (MAX_DILATION, "integers in 1..16")}
    for key, (most, expected) in bounds.items():
        if key in kwargs and not _positive(kwargs[key], most, count=4):
            src.fail(f"spec['backbone'][{key!r}] is {kwargs[key]!r}, expected 4 {expected}")
    return spec


def state_digest(state: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> str:
    """sha256 of a checked spec and every tensor (name, dtype, shape, bytes): what a checkpoint
    records so that a flipped byte is refused on load instead of predicting silently wrong."""
    return tensor_digest(state, header=json.dumps(spec, sort_keys=True).encode())


def build_deeplab(spec: Mapping[str, Any], src: Source | None = None) -> DeepLabV2:
    """DeepLabV2 from a checkpoint spec (checked first; `src`: its file, for the errors). The
    backbone class comes from the BACKBONES allow-list, never from Hydra's instantiate, and
    starts without pretrained weights (the checkpoint's state dict replaces them, and loading
    must not need the network, nor read any file the spec names)."""
    src = src or Source(Path("<segmenter spec>"), SEGMENTER_FIX, CheckpointError)
    spec = check_spec(spec, src)
    backbone_cfg = {k: v for k, v in spec["backbone"].items() if k != "_target_"}
    backbone_cls = BACKBONES[spec["backbone"]["_target_"]][0]
    try:
        backbone = backbone_cls(**{**backbone_cfg, "weights": None, "weights_path": None})
    except (ValueError, TypeError) as err:  # e.g. an unknown arch or norm
        src.fail(f"spec['backbone'] does not build a backbone ({err})", err)
    return DeepLabV2(backbone, spec["num_classes"], spec["rates"])


def save_segmenter(path: str | os.PathLike, net: DeepLabV2, spec: Mapping[str, Any]) -> None:
    """A self-describing checkpoint: the weights plus everything needed to rebuild the net and
    preprocess an image (backbone config, classes, normalisation, MSC scales)."""
    # What load_segmenter would refuse is refused now, not when a later run loads it.
    check_spec(dict(spec), Source(Path(path), "build the spec like segmenter_spec()", ValueError))
    state = net.state_dict()
    payload = {
        "format": SEGMENTER_FORMAT,
        "spec": dict(spec),
        "state_dict": state,
        "digest": state_digest(state, dict(spec)),
    }
    atomic_torch_save(path, payload)


def load_segmenter(path: str | os.PathLike) -> tuple[DeepLabV2, dict[str, Any]]:
    path = Path(path)
    where = "point at round_<t>/train_segmenter/segmenter.pt of a finished run"
    if not path.exists():
        raise CheckpointError(f"segmenter checkpoint {path} not found: {where}")
    if not stat.S_ISREG(path.stat().st_mode):  # never opened: a FIFO would block, a device
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(f"segmenter checkpoint {path} is {kind}: {where}")
    src = Source(path, SEGMENTER_FIX, CheckpointError)
    payload = read_torch(src)
    if not isinstance(payload, dict) or payload.get("format") != SEGMENTER_FORMAT:
        raise CheckpointError(
            f"{path} is not a segmenter checkpoint (format {SEGMENTER_FORMAT!r}); use the "
            "segmenter.pt written by the train_segmenter stage, not a Lightning .ckpt or a CAM/"
            "affinity weight file"
        )
    unknown = sorted(map(str, set(payload) - {"format", "spec", "state_dict", "digest"}))
    if unknown:
        src.fail(f"unknown entries {unknown} (known: format, spec, state_dict, digest)")
    state = tensor_state_dict(payload.get("state_dict"), src, "the 'state_dict'")
    net = build_deeplab(payload.get("spec"), src)
    recorded = payload.get("digest")
    if recorded is None:  # written before checkpoints carried one: loads, unchecked
        log.warning("%s carries no content digest (an older checkpoint): not checked", path)
    elif recorded != state_digest(state, payload["spec"]):
        src.fail("its content does not match its digest (the file was damaged or altered)")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model it describes ({err})") from err
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        src.fail(f"weights {broken[:3]} hold NaN or inf (a diverged training)")
    return net.eval(), payload["spec"]
