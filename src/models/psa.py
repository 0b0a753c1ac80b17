"""PSA's AffinityNet (Ahn & Kwak, CVPR 2018), SEAM's pseudo-mask step (baselines.md §A5).

From jiwoon-ahn/psa network/resnet38_aff.py, train_aff.py and infer_aff.py:

* Features: 1×1 convs (no bias, ELU) on the last three stage outputs (ResNet-38 conv4 / conv5 /
  conv6 → 64 / 128 / 256), concatenated, a 1×1 conv (no bias, ELU) to the affinity feature f.
  All three stages are at output stride 8.
* Affinity of a pixel pair within ``radius`` (5) on the stride-8 grid:
  a_ij = exp(−mean_c |f_i − f_j|) ∈ (0, 1] (PSA takes the channel mean of the L1 distance).
* Loss on pairs labelled from the CRF labels (bg+: both background, fg+: same object class,
  neg: different classes; pairs touching 255 ignored): L = L_bg+/4 + L_fg+/4 + L_neg/2 with
  −log(a) on positives and −log(1 − a) on negatives, each averaged over its own count.
* Unlike IRNet's relation net the backbone is fine-tuned (BN frozen, the first stage frozen),
  with the new layers at 10× lr.

ResNet-38 (Wu et al.) is not in torchvision: the backbone is the project's torchvision ResNet
(src/models/backbone.py) at output stride 8 (strides 2,2,1,1; VOC: dilations 1,1,2,4 as
DeepLab), and the head widths follow its stage widths.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src.models.affinity import affinity_labels
from src.models.backbone import ResNetBackbone
from src.models.optim import (
    DEFAULT_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    lr_groups,
    optimizer_config,
    sgd,
)
from src.postprocess.path_index import get_path_index
from src.postprocess.psa_labels import pair_inside, psa_label_from_rw, random_walk_affinity_batch


class PSAAffinityNet(nn.Module):
    """The affinity feature map f (B, sum(widths), h, w) at the backbone's output stride (8)."""

    def __init__(self, backbone: ResNetBackbone, widths: Sequence[int] = (64, 128, 256)):
        super().__init__()
        if backbone.output_stride != 8:
            raise ValueError(
                f"PSA's AffinityNet works at output stride 8, the backbone has "
                f"{backbone.output_stride}: set affinity.backbone.strides to [2, 2, 1, 1]"
            )
        if len(widths) != 3:
            raise ValueError(f"affinity.widths needs 3 entries (stages 2-4), got {list(widths)}")
        self.backbone = backbone
        self.output_stride = backbone.output_stride
        self.side = nn.ModuleList(
            nn.Conv2d(c, int(w), 1, bias=False)
            for c, w in zip(backbone.out_channels[1:], widths, strict=True)
        )
        total = int(sum(widths))
        self.fuse = nn.Conv2d(total, total, 1, bias=False)
        for conv in self.side:
            nn.init.kaiming_normal_(conv.weight)  # PSA: f8_3/f8_4/f8_5
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # PSA: f9

    def heads(self) -> list[nn.Module]:
        return [self.side, self.fuse]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_stages(x)[1:]
        size = feats[0].shape[-2:]
        sides = [
            F.elu(conv(f))[..., : size[0], : size[1]]
            for conv, f in zip(self.side, feats, strict=True)
        ]
        return F.elu(self.fuse(torch.cat(sides, dim=1)))


def pair_affinity(f: torch.Tensor, radius: int) -> torch.Tensor:
    """a(p, p + d) = exp(−mean_c |f_p − f_{p+d}|) for every pixel p and direction d of
    ``get_path_index(radius)``: (B, D, h, w), 0 where p + d leaves the grid.

    The layout of the walk (src/postprocess/psa_labels.random_walk_affinity); the training
    pairs are its source window, see :func:`source_pairs`. One direction at a time: without
    autograd the memory is the output plus one shifted copy of f; in training each direction's
    |difference| is kept for the backward, B·C·D·h·w floats as in PSA's own gather."""
    pi = get_path_index(radius)
    rf = pi.radius_floor
    h, w = f.shape[-2:]
    padded = F.pad(f, (rf, rf, 0, rf))
    out = [
        torch.exp(-(f - padded[..., dy : dy + h, rf + dx : rf + dx + w]).abs().mean(dim=1))
        for dy, dx in pi.directions.tolist()
    ]
    return torch.stack(out, dim=1) * pair_inside(h, w, radius, f.device)


def source_pairs(aff: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, D, h, w) pair affinities → (B, D, S) on path_index's source window (rows [0, h−rf),
    columns [rf, w−rf)), aligned with ``affinity_labels`` (PSA's ExtractAffinityLabelInRadius:
    the same one-sided directions and window)."""
    pi = get_path_index(radius)
    ch, cw = pi.source_shape(aff.shape[-2], aff.shape[-1])
    rf = pi.radius_floor
    return aff[..., :ch, rf : rf + cw].flatten(-2)


def psa_losses(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PSA train_aff.py: each term averaged over its own pair count (eps 1e-5 as PSA).
    All four arguments are (B, D, S); the labels are 0/1 floats."""
    pos_term = -torch.log(aff + 1e-5)
    neg_term = -torch.log(1.0 + 1e-5 - aff)
    bg = (bg_pos * pos_term).sum() / (bg_pos.sum() + 1e-5)
    fg = (fg_pos * pos_term).sum() / (fg_pos.sum() + 1e-5)
    ng = (neg * neg_term).sum() / (neg.sum() + 1e-5)
    return {"loss": bg / 4 + fg / 4 + ng / 2, "bg_pos": bg, "fg_pos": fg, "neg": ng}


# PSA's train_aff optimiser (its PolyOptimizer has IRNet's momentum quirk: see optim.sgd).
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    sgd, lr=0.1, momentum=0.9, weight_decay=5e-4
)


class PSAAffinityModule(L.LightningModule):
    """Trains PSAAffinityNet on the CRF labels; predict_step walks the CAMs into pseudo-masks."""

    def __init__(
        self,
        net: PSAAffinityNet,
        num_classes: int,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        radius: int = 5,
        head_lr_mult: float = 10.0,
        beta: float = 8,
        logt: int = 8,
        bg_alpha: float = 16,
        label_key: str = "ir_label",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        f = self.net(batch["image"])
        # Nearest, as IRNet's stage (PSA average-pools its CRF scores ×8, then takes the argmax;
        # the affinity_labels role holds hard labels).
        label = F.interpolate(
            batch[self.hparams.label_key][:, None].float(), size=f.shape[-2:], mode="nearest"
        )[:, 0].long()
        radius = self.hparams.radius
        bg_pos, fg_pos, neg = affinity_labels(label, radius, self.hparams.num_classes)
        return psa_losses(source_pairs(pair_affinity(f, radius), radius), bg_pos, fg_pos, neg)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        parts = {f"train/{k}": v for k, v in losses.items() if k != "loss"}
        self.log_dict(parts, batch_size=len(batch["image"]))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def pair_affinities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, ⌈H/8⌉, ⌈W/8⌉) affinities of full images, zero-padded bottom/right to a
        multiple of the stride as PSA's infer_aff (single scale, no flip)."""
        stride = self.net.output_stride
        h, w = images.shape[-2:]
        x = F.pad(images, (0, -w % stride, 0, -h % stride))
        f = self.net(x)[..., : -(-h // stride), : -(-w // stride)]
        return pair_affinity(f, self.hparams.radius)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """``batch["cam"]``: per image the (1 + K, h, w) walk input (psa_labels.walk_input,
        background first); ``batch["keys"]``: its K class ids."""
        images = batch["image"]
        if torch.is_tensor(images):
            aff = list(self.pair_affinities(images).float())
        else:  # different sizes (collate_with_cams): the net sees each alone, the walk all
            aff = [self.pair_affinities(image[None])[0].float() for image in images]
        cams = [torch.as_tensor(c).to(aff[0].device, torch.float32) for c in batch["cam"]]
        for cam, a in zip(cams, aff, strict=True):
            if cam.shape[1:] != a.shape[1:]:
                raise ValueError(
                    f"walk input {tuple(cam.shape)} is not on the {tuple(a.shape[1:])} affinity grid"
                )
        walks = random_walk_affinity_batch(
            cams, aff, beta=self.hparams.beta, logt=self.hparams.logt, radius=self.hparams.radius
        )
        items = []
        for i, (image_id, rw) in enumerate(zip(batch["id"], walks, strict=True)):
            size = tuple(int(s) for s in batch["size"][i])
            mask = psa_label_from_rw(rw, batch["keys"][i], size, self.net.output_stride)
            items.append({"id": image_id, "mask": mask})
        return items

    def configure_optimizers(self):
        heads = [p for m in self.net.heads() for p in m.parameters()]
        groups = lr_groups(
            [p for p in self.net.backbone.parameters() if p.requires_grad],
            heads,
            head_lr_mult=self.hparams.head_lr_mult,
        )
        return optimizer_config(
            groups,
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )
