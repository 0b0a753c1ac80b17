"""CAM classifier: backbone -> (optional CONTA context map concatenated) -> GAP -> 1x1 class
conv without bias.

CONTA's context map M (``src.models.context``) is concatenated channel-wise, by default to the
last stage's output where the same class conv sees it, so CAMs stay `ReLU(W [F; M])`. A net with
a context module reads two more inputs: the image's mask encoding (``context_mask``, B x h x w,
full-image frame) and the input's ``frame`` map (B x 3 x H x W) that places M under the
augmentation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MultilabelAveragePrecision

from src.models.backbone import ResNetBackbone
from src.models.context import (
    ContextModule,
    context_generator,
    own_random_stream,
    sample_in_frame,
)
from src.models.optim import (
    DEFAULT_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    lr_groups,
    optimizer_config,
    sgd,
)

INJECT_POINTS = {"layer2_in": 1, "layer3_in": 2, "layer4_in": 3, "layer4_out": 4}
POST_CONCAT_CONVS = {"none": 0, "1x1": 1, "3x3": 3}


class ContextInputError(ValueError):
    """A CONTA classifier was called without its context mask or frame map."""


class SplitInputConv(nn.Conv2d):
    """A conv over [x; extra channels] computed as conv(x, W_x) + conv(extra, W_e).

    The same function as one conv over the concatenation, and the same state dict, but with the
    extra channels at zero the output is bit-identical to the original conv's: a CONTA round
    with M forced to zero then reproduces round 0 exactly (``conta.ablate=zero_m``)."""

    def __init__(self, base: nn.Conv2d, extra: int) -> None:
        if base.groups != 1:
            raise ValueError("cannot widen a grouped conv for the context channel")
        with own_random_stream():
            super().__init__(
                base.in_channels + extra,
                base.out_channels,
                base.kernel_size,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                bias=base.bias is not None,
            )
        self.to(device=base.weight.device, dtype=base.weight.dtype)
        self.base_channels = base.in_channels
        with torch.no_grad():  # new inputs start with zero weights: the function is unchanged
            self.weight.zero_()
            self.weight[:, : base.in_channels] = base.weight
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.requires_grad_(base.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base_channels
        out = self._conv_forward(x[:, :c], self.weight[:, :c], self.bias)
        return out + self._conv_forward(x[:, c:], self.weight[:, c:], None)


def _widen_stage_input(stage: nn.Sequential, extra: int) -> None:
    """Let a ResNet stage take ``extra`` more input channels: its first block's conv1 and
    shortcut conv both read the stage input."""
    block = stage[0]
    if block.downsample is None:
        raise ValueError(
            "this stage's first block has an identity shortcut, so it cannot take an extra "
            "input channel; inject the context elsewhere"
        )
    block.conv1 = SplitInputConv(block.conv1, extra)
    block.downsample[0] = SplitInputConv(block.downsample[0], extra)


def _identity_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A conv whose first ``out_channels`` inputs pass through unchanged at init (extra inputs
    get zero weights), so adding it does not disturb pretrained features."""
    with own_random_stream():
        conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        idx = torch.arange(out_channels)
        conv.weight[idx, idx, kernel // 2, kernel // 2] = 1.0
    return conv


class CAMNet(nn.Module):
    """backbone -> GAP -> 1x1 class conv without bias; CAM = ReLU(W F).

    With a CONTA ``context`` module the context map M (1 channel, Eq. 3) is concatenated to the
    features at ``inject_at``:
    * "layer4_out" (the author's choice): after the last stage, so the class conv sees [F; M]
      and the CAM is ReLU(W [F; M]); ``post_concat_conv`` ("1x1" / "3x3") inserts an
      identity-initialised conv + ReLU mapping C+1 -> C channels before GAP;
    * "layer4_in" / "layer3_in" / "layer2_in": into that stage's input; its first block's conv1
      and shortcut conv take one more (zero-initialised) input channel.
    M is computed at the confounders' canonical size in the full-image frame and resampled to
    the feature grid through the input's ``frame`` map (see ``sample_in_frame``).

    Common random numbers: the backbone and the feature columns of the class conv draw from the
    global RNG exactly as a net without context does; every CONTA-only parameter (the class
    weight on M, W1/W2) draws from ``generator`` instead. ``ablate_context`` feeds a zero M
    channel (``conta.ablate=zero_m``): with the default injection the net is then round 0's.
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        context: ContextModule | None = None,
        inject_at: str = "layer4_out",
        post_concat_conv: str = "none",
        generator: torch.Generator | None = None,
        ablate_context: bool = False,
    ):
        super().__init__()
        if inject_at not in INJECT_POINTS:
            raise ValueError(f"inject_at={inject_at!r}; choose one of {list(INJECT_POINTS)}")
        if post_concat_conv not in POST_CONCAT_CONVS:
            raise ValueError(
                f"post_concat_conv={post_concat_conv!r}; choose one of {list(POST_CONCAT_CONVS)}"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.context = context
        self.inject_at = inject_at
        self.ablate_context = bool(ablate_context)
        self.post_concat_conv = post_concat_conv if context is not None else "none"
        # Stage index the context map is concatenated in front of (4 = after the last stage).
        self._inject_stage = INJECT_POINTS[inject_at] if context is not None else None
        self.post_conv: nn.Module | None = None
        channels = backbone.out_channels[-1]
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        if context is None:
            return
        if self._inject_stage == 4:
            kernel = POST_CONCAT_CONVS[post_concat_conv]
            if kernel:
                self.post_conv = nn.Sequential(
                    _identity_conv(channels + 1, channels, kernel), nn.ReLU(inplace=True)
                )
            else:
                self.classifier = SplitInputConv(self.classifier, 1)
                with torch.no_grad():  # the class weights on M: a xavier draw of their own
                    bound = math.sqrt(6.0 / (channels + 1 + num_classes))
                    gen = generator if generator is not None else context_generator(0)
                    w_m = torch.rand(num_classes, generator=gen) * 2 * bound - bound
                    self.classifier.weight[:, channels, 0, 0] = w_m
        else:
            if post_concat_conv != "none":
                raise ValueError(
                    f"post_concat_conv={post_concat_conv!r} only applies to "
                    "inject_at=layer4_out; the stage after the concatenation already mixes M"
                )
            if self._inject_stage < backbone.frozen_stages:
                raise ValueError(
                    f"inject_at={inject_at} feeds a frozen stage (backbone.frozen_stages="
                    f"{backbone.frozen_stages}), so W1/W2 would get no gradient; lower "
                    "frozen_stages or inject later"
                )
            _widen_stage_input(backbone.stages[self._inject_stage], 1)

    def head_parameters(self) -> list[nn.Parameter]:
        """Freshly initialised parameters outside the backbone: classifier, W1/W2, post conv
        (without those of a context module that takes no weight decay)."""
        context = None if self.context is None or not self.context.weight_decay else self.context
        modules = [self.classifier, context, self.post_conv]
        return [p for m in modules if m is not None for p in m.parameters()]

    def head_parameters_without_decay(self) -> list[nn.Parameter]:
        """The calibrated context module's parameters: its attention is a cosine, so the loss
        does not depend on the scale of W1/W2 and weight decay would only shrink them."""
        if self.context is None or self.context.weight_decay:
            return []
        return list(self.context.parameters())

    def context_map(self, context_mask: torch.Tensor | None) -> torch.Tensor | None:
        """M (B, 1, h, w) at the canonical size in the full-image frame (None without context)."""
        if self.context is None:
            return None
        if context_mask is None:
            raise ContextInputError("this CAM net has a context module and needs a context mask")
        return self.context(context_mask)

    def context_channel(
        self, context_mask: torch.Tensor | None, drop: bool = False
    ) -> torch.Tensor | None:
        """The map concatenated to the features (the module's channel of M), canonical size;
        zero under ``ablate_context`` or ``drop`` (to measure what M adds to a logit)."""
        m = self.context_map(context_mask)
        if m is None:
            return None
        channel = self.context.channel(m)
        return torch.zeros_like(channel) if (drop or self.ablate_context) else channel

    def _concat(self, x: torch.Tensor, m: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        m_feat = sample_in_frame(m, frame, x.shape[-2:]).to(x.dtype)
        return torch.cat([x, m_feat], dim=1)

    def features(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
        drop_context: bool = False,
        return_stages: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The features the class conv reads; ``return_stages`` also returns the four stage
        outputs (before any concatenation after the last one), for SEAM's PCM."""
        if self.context is None:
            if return_stages:
                stages = self.backbone.forward_stages(x)
                return stages[-1], stages
            return self.backbone(x)
        if frame is None:
            raise ContextInputError("this CAM net has a context module and needs a frame map")
        m = self.context_channel(context_mask, drop=drop_context)
        bb = self.backbone
        stages = []
        for i, stage in enumerate(bb.stages):
            if i == self._inject_stage:
                x = self._concat(x, m, frame)
            # Same gradient gating as ResNetBackbone.forward_stages (frozen stages get none).
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= bb.frozen_stages):
                x = stage(x)
            stages.append(x)
        if self._inject_stage == len(bb.stages):
            x = self._concat(x, m, frame)
            if self.post_conv is not None:
                x = self.post_conv(x)
        return (x, stages) if return_stages else x

    def forward(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
        drop_context: bool = False,
    ) -> torch.Tensor:
        """Class logits (B, num_classes); ``drop_context`` zeroes the M channel."""
        feats = self.features(x, context_mask, frame, drop_context)
        return self.classifier(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def cam(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class activation maps (B, num_classes, h, w) at the backbone's output stride."""
        return F.relu(self.classifier(self.features(x, context_mask, frame)))


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return tuple((s - 1) // stride + 1 for s in size)


def multiscale_cams(
    net: CAMNet,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    context_mask: torch.Tensor | None = None,
    frame: torch.Tensor | None = None,
    cam_stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRNet make_cam: sum over scales (and flips) of the CAMs, at stride 4 and at full resolution.

    With a context net, ``context_mask`` (B, h, w) is the same for every copy (it lives in the
    full-image frame) and ``frame`` (B, 3, H, W) is flipped with the image. The frame is not
    rescaled: the net resamples it straight to each scale's feature grid, which covers the same
    image extent.

    Returns (strided (B,K,ceil(H/4),ceil(W/4)), high_res (B,K,H,W)), not yet normalised.
    """
    height, width = images.shape[-2:]
    out_stride = net.backbone.output_stride
    small = strided_size((height, width), cam_stride)
    # IRNet resizes to the padded multiple of the output stride, then crops: same alignment here.
    up = tuple(math.ceil(s / out_stride) * out_stride for s in (height, width))
    strided = images.new_zeros((images.shape[0], net.num_classes, *small))
    high_res = images.new_zeros((images.shape[0], net.num_classes, height, width))
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        x = (
            images
            if scale == 1.0
            else F.interpolate(images, size, mode="bilinear", align_corners=False)
        )
        m, f = context_mask, frame
        if flip:
            x = torch.cat([x, x.flip(-1)])
            m = None if m is None else torch.cat([m, m])
            f = None if f is None else torch.cat([f, f.flip(-1)])
        cams = net.cam(x, m, f)
        if flip:
            cams = cams[: images.shape[0]] + cams[images.shape[0] :].flip(-1)
        strided += F.interpolate(cams, small, mode="bilinear", align_corners=False)
        high_res += F.interpolate(cams, up, mode="bilinear", align_corners=False)[
            ..., :height, :width
        ]
    return strided, high_res


CAM_NORMALISATIONS = ("max", "min_max")


def keep_and_normalise(
    cams: torch.Tensor, label: torch.Tensor, normalise: str = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ground-truth classes of one image, each scaled to [0, 1]: divided by its own
    max (IRNet make_cam.py), or with ``min_max`` its min subtracted first (SEAM infer_SEAM.py:
    negatives cut to 0, then (x - min) / (max - min)), so a map with a floor everywhere (SEAM's
    PCM output) does not carry that floor into the background score (1 - max)^alpha."""
    if normalise not in CAM_NORMALISATIONS:
        raise ValueError(f"cam.inference.normalise={normalise!r}: use one of {CAM_NORMALISATIONS}")
    keys = torch.nonzero(label > 0.5).flatten()
    kept = cams[keys]
    low = torch.zeros(len(keys), 1, 1, dtype=kept.dtype, device=kept.device)
    if normalise == "min_max":
        kept = kept.clamp(min=0)
        low = kept.flatten(1).amin(dim=1).view(-1, 1, 1)
    kept = (kept - low) / (kept.flatten(1).amax(dim=1).view(-1, 1, 1) - low + 1e-5)
    return kept, keys + 1  # keys as 1-based class ids (0 = background)


CONTEXT_KEYS = ("context_mask", "frame")


# IRNet's train_cam optimiser (irnet_momentum_quirk aside, see optim.sgd).
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    sgd, lr=0.1, momentum=0.9, weight_decay=1e-4
)


class CAMClassifier(L.LightningModule):
    """Multi-label classifier trained with the soft-margin loss; predict_step makes CAMs.

    ``optimizer`` / ``scheduler``: factories (the recipe's ``_partial_`` configs, see optim.py);
    the freshly initialised head learns at ``head_lr_mult`` times the optimiser's lr."""

    def __init__(
        self,
        net: CAMNet,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        head_lr_mult: float = 10.0,
        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        flip: bool = True,
        normalise: str = "max",
    ):
        super().__init__()
        # Factories stay out of the hyperparameters: checkpoints hold plain values only.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_map = MultilabelAveragePrecision(num_labels=net.num_classes, average="macro")

    def forward(
        self,
        images: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.net(images, context_mask, frame)

    def _context_inputs(self, batch: dict) -> dict:
        """The batch's context mask and frame when the net has a context module (else none)."""
        if self.net.context is None:
            return {}
        missing = [k for k in CONTEXT_KEYS if k not in batch]
        if missing:
            raise ContextInputError(
                f"the CONTA classifier needs batch keys {list(CONTEXT_KEYS)}, missing {missing} "
                f"(batch has {sorted(batch)}). Fix: attach 'frame' as an extra target "
                "ExtraTarget('float', load_frame) to every loader (train, val, predict) and wrap "
                "the data sets in ContextMaskDataset(dataset, confounders) for 'context_mask'."
            )
        return {k: batch[k] for k in CONTEXT_KEYS}

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"], **self._context_inputs(batch))
        return F.multilabel_soft_margin_loss(logits, batch["label"]), logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_map.update(torch.sigmoid(logits), batch["label"].long())
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/mAP", self.val_map.compute(), prog_bar=True)
        self.val_map.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        strided, high_res = multiscale_cams(
            self.net,
            batch["image"],
            self.hparams.scales,
            self.hparams.flip,
            **self._context_inputs(batch),
        )
        items = []
        for i, image_id in enumerate(batch["id"]):
            label, normalise = batch["label"][i], self.hparams.normalise
            cam, keys = keep_and_normalise(strided[i], label, normalise)
            high, _ = keep_and_normalise(high_res[i], label, normalise)
            items.append(
                {
                    "id": image_id,
                    "keys": keys.cpu().numpy().astype("int16"),
                    "cam": cam.float().cpu().numpy().astype("float16"),
                    "high_res": high.float().cpu().numpy().astype("float16"),
                }
            )
        return items

    def configure_optimizers(self):
        # W1/W2 (and a post-concat conv) are freshly initialised like the classifier, so they
        # join IRNet's 10x head group; widened backbone convs stay in the backbone group.
        groups = lr_groups(
            [p for p in self.net.backbone.parameters() if p.requires_grad],
            self.net.head_parameters(),
            head_lr_mult=self.hparams.head_lr_mult,
            head_no_decay=self.net.head_parameters_without_decay(),
        )
        return optimizer_config(
            groups,
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )
