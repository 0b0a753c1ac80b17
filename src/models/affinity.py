"""IRNet's inter-pixel relation network: class-boundary and displacement branches on a frozen backbone.

Training follows jiwoon-ahn/irn (net/resnet50_irn.py, step/train_irn.py): pairs within radius 10
on the stride-4 grid; the boundary map B defines affinities a_ij = 1 - max_{k on path} B_k that
are pushed to 1 for same-label pairs and 0 for different-label pairs; the displacement field is
pulled towards the pair offsets inside objects and to zero inside the background.
"""

from __future__ import annotations

import functools

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src.models.backbone import ResNetBackbone
from src.models.optim import (
    DEFAULT_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    lr_groups,
    optimizer_config,
    sgd,
)
from src.postprocess.path_index import affinity_from_boundary, get_path_index
from src.postprocess.random_walk import pseudo_label_from_rw, random_walk_batch


def _side(in_ch: int, out_ch: int, groups: int, up: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class AffinityNet(nn.Module):
    """Boundary logits and displacement field, both at stride 4 (the stem's resolution)."""

    def __init__(self, backbone: ResNetBackbone, edge_width: int = 32, dp_width: int = 256):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        c0, (c1, c2, c3, c4) = backbone.stem_channels, backbone.out_channels
        s3 = backbone.output_stride // 4  # upsampling of layer3/layer4 outputs back to stride 4
        s2 = 2  # layer2 is at stride 8
        e = edge_width
        self.edge = nn.ModuleList(
            [
                _side(c0, e, 4),
                _side(c1, e, 4),
                _side(c2, e, 4, up=s2),
                _side(c3, e, 4, up=s3),
                _side(c4, e, 4, up=s3),
            ]
        )
        self.edge_out = nn.Conv2d(5 * e, 1, 1, bias=True)
        d, half = dp_width, dp_width // 2
        self.dp_low = nn.ModuleList([_side(c0, d // 4, 8), _side(c1, half, 16)])
        self.dp_high = nn.ModuleList(
            [_side(c2, d, 16), _side(c3, d, 16, up=s3 // 2 or 1), _side(c4, d, 16, up=s3 // 2 or 1)]
        )
        self.dp_fuse_high = _side(3 * d, d, 16, up=2)
        self.dp_out = nn.Sequential(_side(d // 4 + half + d, d, 16), nn.Conv2d(d, 2, 1, bias=True))

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        self.backbone.eval()  # entirely frozen, statistics included (IRNet)
        return self

    def heads(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name != "backbone"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = [f.detach() for f in self.backbone.forward_stages(x, with_stem=True)]
        size = feats[0].shape[-2:]
        edges = [
            branch(f)[..., : size[0], : size[1]] for branch, f in zip(self.edge, feats, strict=True)
        ]
        edge = self.edge_out(torch.cat(edges, dim=1))
        low = [branch(f) for branch, f in zip(self.dp_low, feats[:2], strict=True)]
        high_size = feats[2].shape[-2:]
        high = [
            branch(f)[..., : high_size[0], : high_size[1]]
            for branch, f in zip(self.dp_high, feats[2:], strict=True)
        ]
        fused = self.dp_fuse_high(torch.cat(high, dim=1))[..., : size[0], : size[1]]
        displacement = self.dp_out(torch.cat([*low, fused], dim=1))
        return edge, displacement


def affinity_labels(label: torch.Tensor, radius: int, num_classes: int) -> tuple[torch.Tensor, ...]:
    """IRNet GetAffinityLabelFromIndices on a (B, h, w) label map (255 = unsure).

    Returns (bg_pos, fg_pos, neg), each (B, D, S) float: same-label background pairs,
    same-label object pairs, and different-label pairs, among pairs with both labels known.
    """
    pidx = get_path_index(radius)
    pairs = pidx.pairs(label.shape[-2], label.shape[-1], device=label.device)
    flat = label.flatten(1)
    src = flat[:, pairs.src].unsqueeze(1)
    dst = flat[:, pairs.dst]
    valid = (src < num_classes) & (dst < num_classes)
    equal = src == dst
    pos = equal & valid
    return (pos & (dst == 0)).float(), (pos & (dst > 0)).float(), (~equal & valid).float()


def relation_losses(
    edge_logits: torch.Tensor,
    displacement: torch.Tensor,
    label: torch.Tensor,
    radius: int,
    num_classes: int,
) -> dict[str, torch.Tensor]:
    """IRNet's inter-pixel relation losses (train_irn.py), averaged as the reference does."""
    pidx = get_path_index(radius)
    bg_pos, fg_pos, neg = affinity_labels(label, radius, num_classes)
    aff = affinity_from_boundary(torch.sigmoid(edge_logits[:, 0]), pidx)
    pos_term = -torch.log(aff + 1e-5)
    neg_term = -torch.log(1.0 + 1e-5 - aff)
    bg_pos_loss = (bg_pos * pos_term).sum() / (bg_pos.sum() + 1e-5)
    fg_pos_loss = (fg_pos * pos_term).sum() / (fg_pos.sum() + 1e-5)
    neg_loss = (neg * neg_term).sum() / (neg.sum() + 1e-5)
    dp = pidx.to_displacement(displacement)  # (B, 2, D, S)
    target = pidx.displacement_targets().to(dp)
    dp_fg = (torch.abs(dp - target) * fg_pos.unsqueeze(1)).sum() / (2 * fg_pos.sum() + 1e-5)
    dp_bg = (torch.abs(dp) * bg_pos.unsqueeze(1)).sum() / (2 * bg_pos.sum() + 1e-5)
    pos_loss = bg_pos_loss / 2 + fg_pos_loss / 2
    return {
        "loss": (pos_loss + neg_loss) / 2 + (dp_fg + dp_bg) / 2,
        "pos_aff": pos_loss,
        "neg_aff": neg_loss,
        "dp_fg": dp_fg,
        "dp_bg": dp_bg,
    }


# IRNet's train_irn optimiser (irnet_momentum_quirk aside, see optim.sgd).
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    sgd, lr=0.1, momentum=0.9, weight_decay=1e-4
)


class AffinityModule(L.LightningModule):
    """Trains the relation heads on IR labels; predict_step turns CAMs into pseudo-masks."""

    def __init__(
        self,
        net: AffinityNet,
        num_classes: int,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        radius: int = 10,
        dp_lr_mult: float = 10.0,
        beta: float = 10.0,
        exp_times: int = 8,
        walk_radius: int = 5,
        bg_threshold: float = 0.25,
        label_key: str = "ir_label",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        edge, dp = self.net(batch["image"])
        label = F.interpolate(
            batch[self.hparams.label_key][:, None].float(), size=edge.shape[-2:], mode="nearest"
        )
        return relation_losses(
            edge, dp, label[:, 0].long(), self.hparams.radius, self.hparams.num_classes
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        parts = {f"train/{k}": v for k, v in losses.items() if k != "loss"}
        self.log_dict(parts, batch_size=len(batch["image"]))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def boundary(self, images: torch.Tensor) -> torch.Tensor:
        """Boundary probability at stride 4, averaged with the flipped image (IRNet EdgeDisplacement)."""
        stride = self.net.backbone.output_stride
        h, w = images.shape[-2:]
        pad = (0, -w % stride, 0, -h % stride)
        x = F.pad(images, pad)
        edge, _ = self.net(torch.cat([x, x.flip(-1)]))
        edge = torch.sigmoid(edge[: len(images), 0] / 2 + edge[len(images) :, 0].flip(-1) / 2)
        return edge[:, : (h - 1) // 4 + 1, : (w - 1) // 4 + 1]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Random walk of the stride-4 CAMs on the predicted boundaries, then the label map.
        Images of different sizes (a list, collate_with_cams) go through the net one at a time
        and walk together: the walk's cost is its kernel launches, the same for one or many."""
        images = batch["image"]
        if torch.is_tensor(images):
            boundaries = list(self.boundary(images))
        else:
            boundaries = [self.boundary(image[None])[0] for image in images]
        walks = random_walk_batch(
            # float32 CAMs whatever the precision: under bf16-mixed the boundaries are bf16.
            [torch.as_tensor(c).to(boundaries[0].device, torch.float32) for c in batch["cam"]],
            boundaries,
            beta=self.hparams.beta,
            exp_times=self.hparams.exp_times,
            radius=self.hparams.walk_radius,
        )
        items = []
        for i, (image_id, rw) in enumerate(zip(batch["id"], walks, strict=True)):
            size = tuple(int(s) for s in batch["size"][i])
            label = pseudo_label_from_rw(rw, batch["keys"][i], size, self.hparams.bg_threshold)
            items.append({"id": image_id, "mask": label})
        return items

    def configure_optimizers(self):
        edge = [p for m in (self.net.edge, self.net.edge_out) for p in m.parameters()]
        dp = [
            p
            for m in (self.net.dp_low, self.net.dp_high, self.net.dp_fuse_high, self.net.dp_out)
            for p in m.parameters()
        ]
        return optimizer_config(
            lr_groups(edge, dp, head_lr_mult=self.hparams.dp_lr_mult),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )
