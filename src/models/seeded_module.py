"""Lightning modules of the seed-driven baselines: SEC (seeding + expansion + constrain) and DSRG
(seeded region growing + balanced seeding + boundary), trained on localization cues
(src/postprocess/cues.py) at the net's output grid (baselines.md A3, A4).

A batch holds ``image`` (B, 3, S, S) normalised, ``label`` (B, C-1) the image classes and
``cues`` bool (B, C, h, w) on the output grid (channel 0 = background). The training-time CRF
sees the image de-normalised back to uint8, downsized to the grid (SEC's ``zoom`` of the input).
``predict_step`` gives each image's class probabilities on the grid: over all classes (SEC
``demo.py``, DSRG ``test-ms.py``) or kept to the image's own classes (``mask_classes="image"``),
from one input scale or the sum of the logits of several (DSRG ``test-ms.py``: 241, 321, 401).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from src.models.cam import strided_size
from src.models.dsrg import BG_THRESHOLD, FG_THRESHOLD, balanced_seeding_loss, grow_batch
from src.models.dsrg import growth_stats as dsrg_growth_stats
from src.models.optim import (
    DEFAULT_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    optimizer_config,
    sgd,
)
from src.models.seeded import (
    SeededNet,
    constrain_loss,
    crf_targets,
    expansion_loss,
    floored_softmax,
    seeding_loss,
)
from src.postprocess.crf import SEC_TRAIN_CRF, CRFParams

# SEC's solver: base lr 1e-3, momentum 0.9, weight decay 5e-4 (its /10 steps: the recipe's scheduler).
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    sgd, lr=1e-3, momentum=0.9, weight_decay=5e-4
)
MASK_CLASSES = ("all", "image")
# Classes whose probability stays below this on the whole grid are not written: the test-time
# CRF clips probabilities at 1e-5 anyway (crf_probs; SEC demo.py / DSRG test-ms.py: eps 1e-5).
MIN_WRITTEN_PROB = 1e-5


class SeededModule(L.LightningModule):
    """The shared part: net, floored softmax, the CRF target, optimiser groups, prediction.
    Subclasses define ``losses(batch, probs) -> dict`` with a ``loss`` entry."""

    def __init__(
        self,
        net: SeededNet,
        num_classes: int,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        fc67_lr_mult: float = 1.0,
        fc8_lr_mult: float = 10.0,
        bias_lr_mult: float = 2.0,
        bias_decay_mult: float = 0.0,
        floor: float = 1e-4,
        crf: dict | None = None,
        crf_workers: int = 0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        total_steps: int | None = None,
    ):
        super().__init__()
        if not 0 < floor < 1:
            raise ValueError(f"floor={floor}: SEC's softmax floor must lie in (0, 1) (1e-4)")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.crf_params = CRFParams.from_config(crf, "seeded.module.crf") if crf else SEC_TRAIN_CRF
        self.set_prediction()

    def set_prediction(
        self,
        classes: str = "all",
        scales: Sequence[int] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> SeededModule:
        """How predict_step turns the net's logits into pseudo-mask probabilities (not trained,
        not saved: make_seeded_masks sets it from ``seeded.masks``).

        ``classes``: "all" (softmax and later argmax over every class, as SEC ``demo.py`` and
        DSRG ``test-ms.py``) or "image" (the image's own classes and background only).
        ``scales``: None for the input as given; else square sizes the input is resized to
        (bilinear), whose logits are resized to ``grid`` (default: the grid of the input as
        given) and summed before the softmax (DSRG ``test-ms.py``: 241, 321, 401).
        """
        if classes not in MASK_CLASSES:
            raise ValueError(f"seeded.masks.classes={classes!r}: use one of {MASK_CLASSES}")
        if scales is not None:
            scales = [int(s) for s in scales]
            if not scales or min(scales) < 1:
                raise ValueError(f"seeded.masks.scales={scales}: sizes >= 1, or null")
        self.mask_classes, self.test_scales = classes, scales
        self.test_grid = None if grid is None else tuple(int(g) for g in grid)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return floored_softmax(self.net(images).float(), self.hparams.floor)

    def crf_images(self, images: torch.Tensor) -> np.ndarray:
        """The normalised batch back to uint8 RGB (B, S, S, 3), what SEC's CRF layer reads."""
        mean = images.new_tensor(self.hparams.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.hparams.std).view(1, 3, 1, 1)
        rgb = ((images.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        return rgb.permute(0, 2, 3, 1).cpu().numpy()

    def crf_target(self, batch: dict, probs: torch.Tensor) -> torch.Tensor:
        """Q = denseCRF(image, f), a constant target (SEC's CRF layer has no backward)."""
        return crf_targets(
            self.crf_images(batch["image"]),
            probs.detach(),
            self.crf_params,
            workers=self.hparams.crf_workers,
            start_method="fork",
        )

    @staticmethod
    def labels_with_background(batch: dict) -> torch.Tensor:
        label = batch["label"].float()
        return torch.cat([label.new_ones(len(label), 1), label], dim=1)

    def _check_cues(self, cues: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if cues.shape != probs.shape:
            raise ValueError(
                f"cues {tuple(cues.shape)} are not on the net's output grid {tuple(probs.shape)}:"
                " the cue grid and the seeded stage's input size disagree (re-run make_cues "
                "with the same seeded.input_size)"
            )
        return cues.bool()

    def losses(self, batch: dict, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, self.probs(batch["image"]))
        n = len(batch["image"])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n)
        return losses["loss"]

    def test_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, h, w): the net's on ``images``, or with ``test_scales`` the sum over the
        scales of the logits of the input resized to s x s, each resized bilinearly to
        ``test_grid`` (default: the grid of ``images``). DSRG test-ms.py sums fc8 after zooming
        each to the image size; summing on the grid and upsampling once (make_seeded_masks)
        differs only by the interpolation."""
        if not self.test_scales:
            return self.net(images).float()
        grid = self.test_grid or strided_size(tuple(images.shape[-2:]), self.net.output_stride)
        total = 0
        for size in self.test_scales:
            x = images
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            logits = self.net(x).float()
            if tuple(logits.shape[-2:]) != grid:
                logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
            total = total + logits
        return total

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Per image the softmax (no floor) on the grid, background first: over every class
        (``mask_classes="all"``; classes below 1e-5 everywhere are not written) or over the
        image's own classes (``"image"``: the image labels are known on train)."""
        logits = self.test_logits(batch["image"])
        items = []
        for i, image_id in enumerate(batch["id"]):
            if self.mask_classes == "all":
                p = torch.softmax(logits[i], dim=0)
                keep = torch.nonzero(p.flatten(1).amax(1) >= MIN_WRITTEN_PROB).flatten()
                keep = torch.cat([keep.new_zeros(1), keep[keep > 0]])
                p = p[keep]
            else:
                keys = torch.nonzero(batch["label"][i] > 0.5).flatten() + 1
                keep = torch.cat([keys.new_zeros(1), keys])
                # The softmax of the kept logits, not renormalised kept probabilities: where the
                # net is sure of an absent class those underflow to 0 (0/0 in float16).
                p = torch.softmax(logits[i, keep], dim=0)
            items.append(
                {
                    "id": image_id,
                    "keys": keep.cpu().numpy().astype("int16"),
                    "probs": p.cpu().numpy().astype("float16"),
                }
            )
        return items

    def param_groups(self) -> list[dict]:
        """Caffe's per-layer lr_mult / decay_mult (SEC train.prototxt, DSRG train-s.prototxt):
        conv1..fc7 weights x1, fc8 weights ``fc8_lr_mult`` (x10), fc6/fc7 ``fc67_lr_mult`` (x1:
        they start from ImageNet); every bias at ``bias_lr_mult`` (x2) times its layer's rate,
        its weight decay times ``bias_decay_mult`` (0)."""
        hp = self.hparams
        fc8 = {id(p) for p in self.net.fc8_parameters()}
        fc67 = {id(p) for p in self.net.fc67_parameters()}
        split: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            mult = hp.fc8_lr_mult if id(p) in fc8 else hp.fc67_lr_mult if id(p) in fc67 else 1.0
            split.setdefault((float(mult), name.endswith("bias")), []).append(p)
        return [
            {
                "params": params,
                "lr_mult": mult * (hp.bias_lr_mult if bias else 1.0),
                "decay_mult": hp.bias_decay_mult if bias else 1.0,
            }
            for (mult, bias), params in split.items()
        ]

    def configure_optimizers(self):
        groups = self.param_groups()
        steps = self.hparams.total_steps or self.trainer.estimated_stepping_batches
        return optimizer_config(groups, self.optimizer_factory, self.scheduler_factory, int(steps))


class SECModule(SeededModule):
    """SEC: L = seeding + expansion (GWRP, d_fg 0.996, d_bg 0.999) + constrain-to-boundary."""

    def __init__(self, *args, d_fg: float = 0.996, d_bg: float = 0.999, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])

    def losses(self, batch: dict, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        cues = self._check_cues(batch["cues"], probs)
        labels = self.labels_with_background(batch)
        seed = seeding_loss(probs, cues)
        expand = expansion_loss(probs, labels, self.hparams.d_fg, self.hparams.d_bg)
        constrain = constrain_loss(probs, self.crf_target(batch, probs))
        return {
            "loss": seed + expand + constrain,
            "seed": seed,
            "expand": expand,
            "constrain": constrain,
        }


class DSRGModule(SeededModule):
    """DSRG: the cues grown on the CRF-refined prediction (always from the original cues), then
    the balanced seeding loss on the grown seeds + the boundary loss (ratio clipped to
    ``boundary_clip``). No expansion loss."""

    def __init__(
        self,
        *args,
        bg_threshold: float = BG_THRESHOLD,
        fg_threshold: float = FG_THRESHOLD,
        boundary_clip: Sequence[float] = (0.05, 20.0),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])

    def losses(self, batch: dict, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        cues = self._check_cues(batch["cues"], probs)
        target = self.crf_target(batch, probs)
        hp = self.hparams
        grown = grow_batch(
            target, cues, self.labels_with_background(batch), hp.bg_threshold, hp.fg_threshold
        )
        seed = balanced_seeding_loss(probs, grown)
        boundary = constrain_loss(probs, target, clip=tuple(hp.boundary_clip))
        stats = dsrg_growth_stats(cues, grown)
        return {
            "loss": seed + boundary,
            "seed": seed,
            "boundary": boundary,
            "seeded_before": torch.tensor(stats["seeded_before"]),
            "seeded_after": torch.tensor(stats["seeded_after"]),
        }


def upsample_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) grid probabilities -> (K, H, W), bilinear (SEC's test-time upsampling)."""
    t = torch.from_numpy(np.asarray(probs, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
