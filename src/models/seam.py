"""SEAM (Wang et al., CVPR 2020) as a drop-in CAM classifier (baselines.md A5, YudeWang/SEAM).

``SEAMNet`` is a ``CAMNet`` plus SEAM's pixel correlation module (PCM), which refines the CAM by
propagating it over a learned pixel affinity; ``SEAMClassifier`` trains it with the siamese
equivariance losses (L_cls + L_ER + L_ECR) on the image and a x0.3 rescaled copy. Inference
(``cam``) returns the PCM-refined map, so ``multiscale_cams`` and ``CAMClassifier.predict_step``
produce SEAM's CAMs unchanged. CONTA's context map goes through ``CAMNet.features`` (before the
class conv, SEAM's fc8): the PCM then propagates the intervened CAM (baselines.md A1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from src.models.backbone import ResNetBackbone
from src.models.cam import CAMClassifier, CAMNet
from src.models.context import ContextModule

PCM_STAGES = {"layer1": 0, "layer2": 1, "layer3": 2, "layer4": 3}
EPS = 1e-5  # SEAM's epsilon in every normalisation


class SEAMOutput(NamedTuple):
    """One branch of SEAM: ``logits`` (B, K) = GAP of ``cam``; ``cam`` (B, K, h, w) the raw
    (pre-ReLU) class map; ``cam_rv`` (B, K+1, h, w) the PCM output, channel 0 = background."""

    logits: torch.Tensor
    cam: torch.Tensor
    cam_rv: torch.Tensor


def max_norm(cam: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SEAM's ``visualization.max_norm``: ReLU, then per (image, class) min-max scaling."""
    cam = F.relu(cam)
    flat = cam.flatten(2)
    hi = flat.amax(-1)[..., None, None]
    lo = flat.amin(-1)[..., None, None]
    return F.relu(cam - lo - eps) / (hi - lo + eps)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) normalised foreground maps -> (B, K+1, h, w), background = 1 - max fg."""
    return torch.cat([1 - cam.amax(1, keepdim=True), cam], 1)


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """SEAM's ``max_onehot``: keep only each pixel's largest foreground class (channel 0 = bg)."""
    fg = cam[:, 1:]
    fg = fg * (fg == fg.amax(1, keepdim=True))
    return torch.cat([cam[:, :1], fg], 1)


def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """The (detached) CAM the PCM propagates, exactly as SEAM's forward builds ``cam_d_norm``:
    ReLU, each class divided by its max, background = 1 - max fg, non-maximal fg classes 0."""
    cam = F.relu(cam.detach())
    peak = cam.flatten(2).amax(-1)[..., None, None] + EPS
    cam = F.relu(cam - EPS) / peak
    bg = 1 - cam.amax(1, keepdim=True)
    cam = cam * (cam >= cam.amax(1, keepdim=True))
    return torch.cat([bg, cam], 1)


def affinity(f: torch.Tensor) -> torch.Tensor:
    """PCM affinity (B, hw, hw) of features (B, C, h, w): ReLU of the cosine similarity of every
    pixel pair, each column divided by its sum (+1e-5), so column j weights pixel j's sources."""
    f = f.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    aff = F.relu(f.transpose(1, 2) @ f)
    return aff / (aff.sum(1, keepdim=True) + EPS)


def propagate(cam: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """cam_rv = cam @ A: pixel j becomes the affinity-weighted mean of the CAM at every pixel."""
    b, c, h, w = cam.shape
    return (cam.flatten(2) @ aff).view(b, c, h, w)


def ecr_loss(cam_rv: torch.Tensor, cam_other: torch.Tensor, top: float) -> torch.Tensor:
    """One direction of L_ECR: mean of the top ``top`` fraction of |max_onehot(cam) - cam_rv|
    per image, over all (K+1) x h x w entries. k = int(top * N) as SEAM (at least 1); the
    target is detached, so this term trains the PCM only."""
    diff = (max_onehot(cam_other.detach()) - cam_rv).abs().flatten(1)
    k = max(1, int(diff.shape[1] * top))
    return diff.topk(k, dim=1).values.mean()


def min_pool_loss(cam_rv_fg: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """SEAM's code-only ``adaptive_min_pooling_loss`` (not in the paper, baselines.md A5): the
    mean ReLU of the lowest quarter of the per-pixel max over (label-masked) fg classes."""
    x = cam_rv_fg.amax(1).flatten(1)
    k = max(1, int(x.shape[1] * fraction))
    return F.relu(x.topk(k, dim=1, largest=False).values).mean()


class SEAMNet(CAMNet):
    """CAMNet (class conv = SEAM's fc8, foreground only) + dropout + SEAM's PCM.

    SEAM's backbone is ResNet-38 (MXNet weights), which torchvision does not have; this uses a
    torchvision ResNet, meant at output stride 8 (strides (2, 2, 1, 1), dilations (1, 1, 2, 4)).
    SEAM's fc8 also has a background channel, but it gets no gradient (every loss reads the
    foreground channels and rebuilds background as 1 - max fg), so it is left out here.

    PCM: SEAM reads conv4 (512-d) and conv5 (1024-d), the two blocks feeding conv6 (the CAM
    feature), through 1x1 convs to 64 and 128 channels + ReLU (f8_3, f8_4). Here
    ``pcm_stages`` = ("layer2", "layer3") by default: the two stages feeding the CAM stage,
    512-d and 1024-d in ResNet-50/101 as in ResNet-38, reduced by ``pcm_ratio`` = 8 as SEAM
    (so 64 and 128 there). They read detached features, so the PCM does not train the
    backbone. With the image resized to the feature grid, a 1x1 conv (f9: 3 + 64 + 128 -> 192
    in SEAM, Xavier gain 4) gives the affinity features. The PCM convs draw from the global RNG
    after CAMNet's parameters, so a CONTA round still shares round 0's random numbers.

    ``dropout``: SEAM's Dropout2d(0.5) between conv6 and fc8, applied to the backbone channels
    only (a CONTA M channel concatenated after the last stage is never dropped).
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
        dropout: float = 0.5,
        pcm_stages: Sequence[str] = ("layer2", "layer3"),
        pcm_ratio: int = 8,
    ):
        super().__init__(
            backbone,
            num_classes,
            context=context,
            inject_at=inject_at,
            post_concat_conv=post_concat_conv,
            generator=generator,
            ablate_context=ablate_context,
        )
        unknown = [s for s in pcm_stages if s not in PCM_STAGES]
        if unknown or not pcm_stages:
            raise ValueError(f"pcm_stages={list(pcm_stages)}; choose from {list(PCM_STAGES)}")
        self.dropout = nn.Dropout2d(dropout)
        self.pcm_stage_ids = [PCM_STAGES[s] for s in pcm_stages]
        widths = [max(1, backbone.out_channels[i] // pcm_ratio) for i in self.pcm_stage_ids]
        self.pcm_convs = nn.ModuleList(
            nn.Conv2d(backbone.out_channels[i], w, 1, bias=False)
            for i, w in zip(self.pcm_stage_ids, widths, strict=True)
        )
        self.pcm_proj = nn.Conv2d(3 + sum(widths), sum(widths), 1, bias=False)
        for conv in self.pcm_convs:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.pcm_proj.weight, gain=4)

    def head_parameters(self) -> list[nn.Parameter]:
        """The PCM convs are trained from scratch like fc8: SEAM's 10x group."""
        pcm = [*self.pcm_convs.parameters(), *self.pcm_proj.parameters()]
        return super().head_parameters() + pcm

    def _class_map(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None,
        frame: torch.Tensor | None,
        drop_context: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats, stages = self.features(x, context_mask, frame, drop_context, return_stages=True)
        c = self.backbone.out_channels[-1]
        feats = torch.cat([self.dropout(feats[:, :c]), feats[:, c:]], 1)
        return self.classifier(feats), stages

    def pcm_features(
        self, x: torch.Tensor, stages: list[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        """f9([image; ReLU(f8_3(stage)); ReLU(f8_4(stage))]) on the CAM grid ``size``."""
        size = tuple(size)
        parts = [F.interpolate(x, size, mode="bilinear", align_corners=True)]
        for conv, i in zip(self.pcm_convs, self.pcm_stage_ids, strict=True):
            f = stages[i].detach()
            if f.shape[-2:] != size:
                f = F.interpolate(f, size, mode="bilinear", align_corners=True)
            parts.append(F.relu(conv(f)))
        return self.pcm_proj(torch.cat(parts, 1))

    def seam_outputs(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
    ) -> SEAMOutput:
        """Everything one SEAM branch needs: logits, raw CAM and the PCM-refined cam_rv."""
        cam, stages = self._class_map(x, context_mask, frame)
        f = self.pcm_features(x, stages, cam.shape[-2:])
        # The hw x hw affinity in float32: its column sums run over thousands of pixels.
        with torch.autocast(device_type=x.device.type, enabled=False):
            cam_rv = propagate(pcm_input(cam).float(), affinity(f.float()))
        return SEAMOutput(cam.mean(dim=(2, 3)), cam, cam_rv)

    def forward(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
        drop_context: bool = False,
    ) -> torch.Tensor:
        """Class logits (B, num_classes) = GAP of the class map (SEAM's label1); the class conv
        has no bias, so this is CAMNet's GAP -> class conv."""
        return self._class_map(x, context_mask, frame, drop_context)[0].mean(dim=(2, 3))

    def cam(
        self,
        x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SEAM's inference map: ReLU of cam_rv's foreground channels (B, K, h, w)."""
        return F.relu(self.seam_outputs(x, context_mask, frame).cam_rv[:, 1:])


class SEAMClassifier(CAMClassifier):
    """CAMClassifier trained with SEAM's siamese losses (baselines.md A5, train_SEAM.py).

    Branch 1 is the batch, branch 2 the batch bilinearly rescaled by ``rescale``. Both branches'
    maps are upsampled to their input size and max-normalised (branch 1 then rescaled to
    branch 2's size), masked by the labels (background always on), then
    L_cls = mean over branches of the multi-label soft margin on the logits;
    L_ER = mean |cam1 - cam2| over the foreground channels;
    L_ECR = top-``ecr_top`` L1 of (cam_rv1 vs max_onehot(cam2)) + (cam_rv2 vs max_onehot(cam1));
    L_min = SEAM's code-only min-pooling term on the raw cam_rv (``min_pool_weight`` 0: paper).
    With CONTA both branches get the same context mask and frame map: the net resamples the
    frame straight onto each branch's feature grid (as ``multiscale_cams`` does for scales).
    Validation and prediction are CAMClassifier's (predict reads ``net.cam``, i.e. cam_rv).
    """

    def __init__(
        self,
        net: SEAMNet,
        rescale: float = 0.3,
        er_weight: float = 1.0,
        ecr_weight: float = 1.0,
        ecr_top: float = 0.2,
        min_pool_weight: float = 1.0,
        **kwargs,
    ):
        if not 0 < rescale < 1 or not 0 < ecr_top <= 1:
            raise ValueError(f"rescale={rescale} and ecr_top={ecr_top} must lie in (0, 1)")
        super().__init__(net, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])

    def seam_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        img1, label = batch["image"], batch["label"]
        context = self._context_inputs(batch)
        size1 = tuple(img1.shape[-2:])
        size2 = tuple(max(1, int(s * hp.rescale)) for s in size1)
        img2 = F.interpolate(img1, size2, mode="bilinear", align_corners=True)
        out1 = self.net.seam_outputs(img1, **context)
        out2 = self.net.seam_outputs(img2, **context)

        def up(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
            return F.interpolate(t, size, mode="bilinear", align_corners=True)

        fg = label[:, :, None, None].to(out1.cam.dtype)
        full = F.pad(fg, (0, 0, 0, 0, 1, 0), value=1.0)  # background label always 1
        rv1_raw, rv2_raw = up(out1.cam_rv, size1) * full, up(out2.cam_rv, size2) * full
        cam1 = up(max_norm(up(out1.cam, size1)), size2) * fg
        rv1 = up(max_norm(rv1_raw), size2) * full
        cam2 = max_norm(up(out2.cam, size2)) * fg
        rv2 = max_norm(rv2_raw) * full

        loss_cls = (
            F.multilabel_soft_margin_loss(out1.logits, label)
            + F.multilabel_soft_margin_loss(out2.logits, label)
        ) / 2
        loss_min = (min_pool_loss(rv1_raw[:, 1:]) + min_pool_loss(rv2_raw[:, 1:])) / 2
        loss_er = (cam1 - cam2).abs().mean()
        cam1, cam2 = with_background(cam1), with_background(cam2)
        loss_ecr = ecr_loss(rv1, cam2, hp.ecr_top) + ecr_loss(rv2, cam1, hp.ecr_top)
        loss = (
            loss_cls
            + hp.min_pool_weight * loss_min
            + hp.er_weight * loss_er
            + hp.ecr_weight * loss_ecr
        )
        return {
            "loss": loss,
            "loss_cls": loss_cls,
            "loss_min": loss_min,
            "loss_er": loss_er,
            "loss_ecr": loss_ecr,
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.seam_losses(batch)
        for name, value in losses.items():
            self.log(
                f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["image"])
            )
        return losses["loss"]
