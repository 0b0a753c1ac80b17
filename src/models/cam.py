"""CAM classifier: backbone -> (optional extra map concatenated) -> GAP -> 1x1 class conv without bias.

The extra input is CONTA's context map M: it is resized to the feature map, concatenated channel-wise
to the last stage's output and seen by the same class conv, so CAMs stay `ReLU(W [F; M])`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MultilabelAveragePrecision

from src.models.backbone import ResNetBackbone
from src.models.optim import effective_momentum, poly_sgd, sgd_param_groups


class CAMNet(nn.Module):
    def __init__(self, backbone: ResNetBackbone, num_classes: int, extra_channels: int = 0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.extra_channels = extra_channels
        self.classifier = nn.Conv2d(
            backbone.out_channels[-1] + extra_channels, num_classes, kernel_size=1, bias=False
        )
        nn.init.xavier_uniform_(self.classifier.weight)

    def features(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.backbone(x)
        if self.extra_channels:
            if extra is None:
                raise ValueError(f"this CAM net expects a {self.extra_channels}-channel extra map")
            extra = F.interpolate(
                extra, size=feats.shape[-2:], mode="bilinear", align_corners=False
            )
            feats = torch.cat([feats, extra.to(feats.dtype)], dim=1)
        return feats

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        pooled = self.features(x, extra).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def cam(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Class activation maps (B, num_classes, h, w) at the backbone's output stride."""
        return F.relu(F.conv2d(self.features(x, extra), self.classifier.weight))


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return tuple((s - 1) // stride + 1 for s in size)


def multiscale_cams(
    net: CAMNet,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    extra: torch.Tensor | None = None,
    cam_stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRNet make_cam: sum over scales (and flips) of the CAMs, at stride 4 and at full resolution.

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
        e = extra
        if flip:
            x = torch.cat([x, x.flip(-1)])
            e = None if extra is None else torch.cat([extra, extra.flip(-1)])
        cams = net.cam(x, e)
        if flip:
            cams = cams[: images.shape[0]] + cams[images.shape[0] :].flip(-1)
        strided += F.interpolate(cams, small, mode="bilinear", align_corners=False)
        high_res += F.interpolate(cams, up, mode="bilinear", align_corners=False)[
            ..., :height, :width
        ]
    return strided, high_res


def keep_and_normalise(
    cams: torch.Tensor, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ground-truth classes of one image, each divided by its own max (IRNet)."""
    keys = torch.nonzero(label > 0.5).flatten()
    kept = cams[keys]
    kept = kept / (kept.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)
    return kept, keys + 1  # keys as 1-based class ids (0 = background)


class CAMClassifier(L.LightningModule):
    """Multi-label classifier trained with the soft-margin loss; predict_step makes CAMs."""

    def __init__(
        self,
        net: CAMNet,
        lr: float = 0.1,
        head_lr_mult: float = 10.0,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        irnet_momentum_quirk: bool = False,
        poly_power: float = 0.9,
        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        flip: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_map = MultilabelAveragePrecision(num_labels=net.num_classes, average="macro")

    @property
    def effective_momentum(self) -> float:
        return effective_momentum(self.hparams.momentum, self.hparams.irnet_momentum_quirk)

    def forward(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images, extra)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"], batch.get("context_map"))
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
            batch.get("context_map"),
        )
        items = []
        for i, image_id in enumerate(batch["id"]):
            cam, keys = keep_and_normalise(strided[i], batch["label"][i])
            high, _ = keep_and_normalise(high_res[i], batch["label"][i])
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
        groups = sgd_param_groups(
            [p for p in self.net.backbone.parameters() if p.requires_grad],
            list(self.net.classifier.parameters()),
            lr=self.hparams.lr,
            head_lr_mult=self.hparams.head_lr_mult,
            weight_decay=self.hparams.weight_decay,
        )
        return poly_sgd(
            groups,
            lr=self.hparams.lr,
            momentum=self.effective_momentum,
            total_steps=int(self.trainer.estimated_stepping_batches),
            power=self.hparams.poly_power,
        )
