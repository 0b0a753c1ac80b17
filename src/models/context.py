"""CONTA's context module (Eq. 3) and the confounder set it attends over.

Round t > 0 of CONTA feeds the CAM classifier an image-specific context map

    M = sum_i alpha_i * P(c_i) * c_i,   alpha = softmax_i((W1 m)^T (W2 c_i) / sqrt(d))

where c_i is the average mask of class i over the training images (from the previous round's
segmenter), P(c_i) its prior and m the image's own mask encoding, all at one canonical h x w in
the full-image frame. ``ContextModule`` computes M; ``Confounders`` is the on-disk artifact
(centers, prior, per-image masks); ``ConfounderAccumulator`` and ``encode_mask`` build it.

Geometry: M lives in the full-image frame. ``sample_in_frame`` moves it into the frame of an
augmented input through the per-pixel ``frame`` map (u, v, valid) that the data pipeline attaches
(``src.datamodules.transforms.frame_grid``), so M follows every crop, rescale and flip.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from src.utils.errors import UserError
from src.utils.io import atomic_save_npz, atomic_write_json
from src.utils.untrusted import Source, check_fields, parse_json, read_npz

log = logging.getLogger(__name__)

CONFOUNDERS_FILE = "confounders.npz"
META_FILE = "confounders.json"  # human-readable copy of the metadata; load() reads the npz only
FORMAT_VERSION = 1
IGNORE_ID = 255
ENCODINGS = ("foreground", "class_id")
PRIORS = ("uniform", "empirical")
Encoding = Literal["foreground", "class_id"]
Prior = Literal["uniform", "empirical"]


class ConfounderError(UserError, ValueError):
    """The confounder file is missing, inconsistent with the run, or lacks an image."""


CONFOUNDER_ARRAYS = {"centers": "f", "prior": "f", "counts": "iu", "ids": "U", "codes": "iu"}
# What Confounders.meta() writes; the provenance keys are absent from files of older versions.
META_SCHEMA = {
    "format_version": int,
    "dataset": str,
    "num_classes": int,
    "size": list[int],
    "class_names": list[str],
    "encoding": str,
    "mask_scale": float,
    "num_images": int,
    "counts": list[int],
    "prior": list[float],
    "context": str,
    "c_source": str,
    "m_source": str,
}
META_OPTIONAL = ("context", "c_source", "m_source")


# --------------------------------------------------------------------------------------------
# Eq. 3


CONTEXT_VARIANTS = ("calibrated", "paper")
# conta.attention: image = Eq. 3's alpha from the image's m | prior = alpha = P(c) for every image
# (a control: the same M for every image, no m, no W1/W2; it says what C and the extra channel
# give without the per-image attention).
ATTENTION_MODES = ("image", "prior")


@contextmanager
def own_random_stream():
    """Build modules without touching the global RNG: a round with a context module then draws
    the same backbone / classifier init, data order and augmentation as round 0 (common random
    numbers), and differs from it by M alone."""
    with torch.random.fork_rng(devices=[]):
        yield


def context_generator(seed: int) -> torch.Generator:
    """The generator every freshly initialised CONTA parameter draws from (see CAMNet)."""
    return torch.Generator().manual_seed(int(seed) % (2**63 - 1) + 7919)


class ContextModule(nn.Module):
    """Eq. 3 as printed (``conta.context=paper``): M = (softmax(W1 m (W2 C)^T / sqrt(d)) * P) @ C.

    C (n, h, w) and P (n,) are persistent buffers, so a saved state dict carries the confounder
    set the weights were trained with. W1, W2: Linear(h*w -> d), d = n unless ``proj_dim``,
    N(0, 0.02) as CONTA's m_t.py. Measured at this init (6 confounders at 12 x 12, random
    masks): every alpha within 1 % of 1/n, M < 0.012 and nearly the same map for every image;
    ``CalibratedContextModule`` is the variant that starts live.
    """

    variant = "paper"
    projection_bias = True  # nn.Linear's, as m_t.py
    weight_decay = True  # trained like the classifier

    def __init__(
        self,
        confounders: torch.Tensor,
        prior: torch.Tensor,
        proj_dim: int | None = None,
        generator: torch.Generator | None = None,
        attention: str = "image",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(
                f"conta.attention={attention!r} is unknown; choose one of {list(ATTENTION_MODES)} "
                "(e.g. conta.attention=image)"
            )
        self.attention_mode = attention
        confounders = torch.as_tensor(confounders, dtype=torch.float32)
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if confounders.ndim != 3:
            raise ValueError(f"confounders must be (n, h, w), got {tuple(confounders.shape)}")
        n, h, w = confounders.shape
        if prior.shape != (n,):
            raise ValueError(f"prior must be ({n},) to match the confounders, got {prior.shape}")
        if not (torch.isfinite(confounders).all() and torch.isfinite(prior).all()):
            raise ValueError("confounders / prior contain NaN or inf")
        self.size = (h, w)
        self.proj_dim = int(proj_dim or self.default_proj_dim(n, h * w))
        self.register_buffer("confounders", confounders.clone())
        self.register_buffer("prior", prior.clone())
        with own_random_stream():
            self.w1 = nn.Linear(h * w, self.proj_dim, bias=self.projection_bias)
            self.w2 = nn.Linear(h * w, self.proj_dim, bias=self.projection_bias)
        # Never the global generator: see own_random_stream.
        self._init_parameters(generator if generator is not None else context_generator(0))

    @staticmethod
    def default_proj_dim(n: int, hw: int) -> int:
        return n

    def _init_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for lin in (self.w1, self.w2):  # VC R-CNN / CONTA m_t.py init
                lin.weight.normal_(0.0, 0.02, generator=generator)
                lin.bias.zero_()

    @property
    def num_confounders(self) -> int:
        return self.confounders.shape[0]

    def _flat_mask(self, mask: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        if mask.ndim == 3 and tuple(mask.shape[1:]) == (h, w):
            return mask.flatten(1)
        if mask.ndim == 2 and mask.shape[1] == h * w:
            return mask
        raise ValueError(
            f"context mask must be (B, {h}, {w}) or (B, {h * w}) to match the confounders, "
            f"got {tuple(mask.shape)}"
        )

    def scores(self, mask: torch.Tensor) -> torch.Tensor:
        """Attention logits (B, n) before the softmax."""
        q = self.w1(self._flat_mask(mask).to(self.w1.weight.dtype))
        k = self.w2(self.confounders.flatten(1).to(self.w2.weight.dtype))
        return q @ k.t() / math.sqrt(self.proj_dim)

    def attention(self, mask: torch.Tensor) -> torch.Tensor:
        """alpha (B, n): how much each class's average mask explains the image's mask; with
        ``attention="prior"`` P(c) (normalised) for every image, whatever its m."""
        if self.attention_mode == "prior":
            flat = self._flat_mask(mask)
            prior = self.prior.to(self.w1.weight.dtype)
            prior = prior / prior.sum().clamp_min(1e-12)
            return prior.expand(flat.shape[0], -1)
        return torch.softmax(self.scores(mask), dim=-1)

    def combine(self, alpha: torch.Tensor) -> torch.Tensor:
        """M (B, h*w) = sum_i alpha_i P(c_i) c_i."""
        flat = self.confounders.flatten(1).to(alpha.dtype)
        return (alpha * self.prior.to(alpha.dtype)) @ flat

    def forward(
        self, mask: torch.Tensor, return_alpha: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """M (B, 1, h, w) for masks (B, h, w) or (B, h*w); with return_alpha also alpha (B, n)."""
        alpha = self.attention(mask)
        m = self.combine(alpha).view(-1, 1, *self.size)
        return (m, alpha) if return_alpha else m

    def channel(self, context_map: torch.Tensor) -> torch.Tensor:
        """The map that joins the backbone features: M itself, as the paper concatenates it."""
        return context_map


class CalibratedContextModule(ContextModule):
    """Eq. 3 with its scale and conditioning fixed (``conta.context=calibrated``, the default).

    Same definition (alpha over the n confounders, M a prior-weighted mix of the c_i, one channel
    concatenated to the backbone); each change answers a measurement of the paper module:

    * cosine attention: alpha = softmax(tau * cos(W1 m, W2 c_i)). The paper's score is a dot
      product of two N(0, 0.02) projections: every alpha sat within 1 % of 1/n, and each
      projection gets almost no gradient through the other; a cosine is scale-free and of
      order 1 at init.
    * W1 = W2 = identity at init (d = h*w unless ``proj_dim``; a shared scaled orthonormal
      projection when d < h*w), so at init alpha ranks the confounders by how well each c_i
      overlaps the image's own mask, and learning refines that instead of starting from noise.
    * a learnable temperature tau (log-parametrised, init ``temperature``). Measured at init on
      the round-0 confounders of ``make train`` (320 layout images): tau 1 / 3 / 10 / 30 give
      alpha entropy / log n 0.99 / 0.92 / 0.59 / 0.42 and m_spread 0.15 / 0.44 / 0.93 / 1.08;
      10 is live without being one-hot (the paper module: 1.00 and 0.002).
    * M renormalised by sum_i alpha_i P(c_i): a convex mix of class masks in [0, 1], not one
      scaled by P = 1/n (~0.01 for VOC).
    * the channel that joins the features is g * (M - mean(C)) / std(C) with a learnable gain g
      (init 1): it starts at unit scale, like the batch-normalised features, and is signed, so
      a class weight on it can both raise and lower the CAM where the prior says.
    """

    variant = "calibrated"
    # A bias would be the same for every image, and the cosine ignores the scale of W1 m: with
    # weight decay shrinking W1 the bias took over and alpha became one vector for every image
    # (measured in make train: m_spread 0 in round 1). So: no bias, and no weight decay.
    projection_bias = False
    weight_decay = False

    def __init__(
        self,
        confounders: torch.Tensor,
        prior: torch.Tensor,
        proj_dim: int | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 10.0,
        attention: str = "image",
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"conta.temperature={temperature} must be > 0")
        # Set before super().__init__, whose _init_parameters creates tau and the gain from it.
        self._temperature0 = float(temperature)
        super().__init__(confounders, prior, proj_dim, generator, attention)

    @staticmethod
    def default_proj_dim(n: int, hw: int) -> int:
        return hw

    def _init_parameters(self, generator: torch.Generator | None = None) -> None:
        hw = self.size[0] * self.size[1]
        with torch.no_grad():
            if self.proj_dim == hw:
                basis = torch.eye(hw)
            else:
                # Rows orthonormal, scaled so |Q x| ~ |x| (Johnson-Lindenstrauss).
                basis = torch.linalg.qr(torch.randn(hw, hw, generator=generator))[0]
                basis = basis[: self.proj_dim] * math.sqrt(hw / self.proj_dim)
            for lin in (self.w1, self.w2):
                lin.weight.copy_(basis)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self._temperature0)))
        self.gain = nn.Parameter(torch.tensor(1.0))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def scores(self, mask: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.w1(self._flat_mask(mask).to(self.w1.weight.dtype)), dim=-1)
        k = F.normalize(self.w2(self.confounders.flatten(1).to(self.w2.weight.dtype)), dim=-1)
        return self.temperature * (q @ k.t())

    def combine(self, alpha: torch.Tensor) -> torch.Tensor:
        weights = alpha * self.prior.to(alpha.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return weights @ self.confounders.flatten(1).to(alpha.dtype)

    def channel(self, context_map: torch.Tensor) -> torch.Tensor:
        centers = self.confounders
        return self.gain * (context_map - centers.mean()) / centers.std().clamp_min(1e-3)


def build_context_module(
    variant: str,
    confounders: torch.Tensor,
    prior: torch.Tensor,
    *,
    proj_dim: int | None = None,
    temperature: float = 10.0,
    generator: torch.Generator | None = None,
    attention: str = "image",
) -> ContextModule:
    """The context module of ``conta.context`` (calibrated | paper), its alpha from the image's m
    or, with ``attention="prior"`` (``conta.attention``), alpha = P(c) for every image."""
    if variant == "paper":
        return ContextModule(confounders, prior, proj_dim, generator, attention)
    if variant == "calibrated":
        return CalibratedContextModule(
            confounders, prior, proj_dim, generator, temperature, attention
        )
    raise ValueError(
        f"conta.context={variant!r} is unknown; choose one of {list(CONTEXT_VARIANTS)} "
        "(calibrated: the live module, paper: Eq. 3 as printed, for the ablation)"
    )


@torch.no_grad()
def context_statistics(module: ContextModule, masks: torch.Tensor, batch: int = 256) -> dict:
    """Is M alive? Over the images' masks m (N, h, w):

    alpha_max: mean of max_i alpha_i (1/n = uniform attention, 1 = one confounder per image);
    alpha_entropy: mean entropy of alpha / log n (1 = uniform);
    m_spread: mean over positions of the std of M across images, / the mean of M (0 = the same
    map for every image). M is Eq. 3's output before any gain, so variants compare.
    """
    alphas, maps = [], []
    for start in range(0, len(masks), batch):
        m, alpha = module(masks[start : start + batch].float(), return_alpha=True)
        alphas.append(alpha.double())
        maps.append(m.flatten(1).double())
    alpha = torch.cat(alphas)
    maps = torch.cat(maps)
    n = alpha.shape[1]
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / math.log(max(n, 2))
    spread = maps.std(0, unbiased=False).mean() / maps.mean().abs().clamp_min(1e-12)
    return {
        "alpha_max": float(alpha.max(-1).values.mean()),
        "alpha_entropy": float(entropy.mean()),
        "m_spread": float(spread),
        "m_mean": float(maps.mean()),
        "m_max": float(maps.max()),
    }


def sample_in_frame(
    context: torch.Tensor, frame: torch.Tensor, size: Sequence[int]
) -> torch.Tensor:
    """Resample full-image-frame maps (B, C, h, w) onto a grid of ``size`` covering an input
    whose per-pixel frame map is ``frame`` (B, 3, H, W) = (u, v, valid).

    The frame is resized bilinearly to ``size`` (coordinates are linear, so this is exact away
    from padding). Where a cell straddles padding, the interpolated (u, v) are pulled towards the
    padding's 0; dividing by the interpolated valid restores the mean coordinate of the cell's
    valid pixels, and the result is weighted by valid (0 in padding).
    """
    if frame.ndim != 4 or frame.shape[1] != 3:
        raise ValueError(f"frame must be (B, 3, H, W) = (u, v, valid), got {tuple(frame.shape)}")
    if frame.shape[0] != context.shape[0]:
        raise ValueError(f"frame batch {frame.shape[0]} != context batch {context.shape[0]}")
    f = F.interpolate(frame.float(), size=tuple(size), mode="bilinear", align_corners=False)
    valid = f[:, 2:3].clamp(0.0, 1.0)
    uv = f[:, :2] / valid.clamp_min(1e-6)
    grid = uv.permute(0, 2, 3, 1)  # (B, h, w, 2) as (x, y)
    # "border", not "zeros": pixels along the image edge sample up to half a canonical cell
    # outside M's centres, where a plain resize of M clamps too; padding is zeroed by valid.
    out = F.grid_sample(
        context.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out * valid


# --------------------------------------------------------------------------------------------
# Building the confounder set


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Pixel-centre nearest neighbour (align_corners=False): dst pixel j <- src floor((j+.5)s/d)."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def resize_nearest(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A full-image label map (H, W) at ``size`` (h, w), nearest neighbour, whole-image frame."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
    h, w = (int(s) for s in size)
    rows = _nearest_index(label.shape[0], h)
    cols = _nearest_index(label.shape[1], w)
    return label[rows[:, None], cols[None, :]]


def _check_ids(small: np.ndarray, num_classes: int) -> None:
    bad = (small > num_classes) & (small != IGNORE_ID)
    if bad.any():
        raise ValueError(
            f"prediction holds class id {int(small[bad].max())} but there are only {num_classes} "
            f"foreground classes (ids 0 = background, 1..{num_classes}, {IGNORE_ID} = ignore)"
        )


def mask_code(small: np.ndarray, encoding: str, num_classes: int) -> tuple[np.ndarray, float]:
    """uint8 code and scale of m for a label map already at (h, w): m = code * scale.

    "foreground": 1 on every foreground pixel; "class_id": the class id / n, keeping identity.
    Storing the integer code keeps the per-image masks 4x smaller than float32 and exact.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"mask encoding {encoding!r}; choose one of {ENCODINGS}")
    _check_ids(small, num_classes)
    fg = (small != 0) & (small != IGNORE_ID)
    if encoding == "foreground":
        return fg.astype(np.uint8), 1.0
    return np.where(fg, small, 0).astype(np.uint8), 1.0 / num_classes


def encode_mask(
    pred: np.ndarray, size: Sequence[int], encoding: Encoding = "foreground", num_classes: int = 0
) -> np.ndarray:
    """m for one image: its (H, W) class-id map resized (nearest, full frame) to size, encoded.

    ``num_classes`` = number of foreground classes n (ids 1..n).
    """
    if num_classes <= 0:
        raise ValueError("encode_mask needs num_classes = the number of foreground classes")
    code, scale = mask_code(resize_nearest(pred, size), encoding, num_classes)
    return code.astype(np.float32) * np.float32(scale)


class ConfounderAccumulator:
    """Running per-class sums of 1[pred == i] over images labelled with class i (ids 1..n)."""

    def __init__(self, num_classes: int, size: Sequence[int]) -> None:
        self.num_classes = int(num_classes)
        self.size = tuple(int(s) for s in size)
        self.sums = np.zeros((self.num_classes, *self.size), np.float64)
        self.counts = np.zeros(self.num_classes, np.int64)

    def update(self, pred: np.ndarray, image_labels: np.ndarray) -> None:
        """pred (H, W) full-image class ids (or already (h, w)); image_labels (n,) multi-hot."""
        labels = np.asarray(image_labels).reshape(-1)
        if labels.shape != (self.num_classes,):
            raise ValueError(f"image labels must be ({self.num_classes},), got {labels.shape}")
        small = pred if pred.shape == self.size else resize_nearest(pred, self.size)
        _check_ids(small, self.num_classes)
        for i in np.flatnonzero(labels > 0.5):
            self.sums[i] += small == i + 1
            self.counts[i] += 1

    def merge(self, other: ConfounderAccumulator) -> ConfounderAccumulator:
        if (other.num_classes, other.size) != (self.num_classes, self.size):
            raise ValueError("cannot merge accumulators of different class counts or sizes")
        self.sums += other.sums
        self.counts += other.counts
        return self

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts): the two arrays a distributed run sums across ranks."""
        return self.sums, self.counts

    def finalize(
        self, prior: Prior = "uniform", class_names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """centers (n, h, w) float32 = sums / counts (zeros for an unseen class), prior (n,)."""
        if prior not in PRIORS:
            raise ValueError(f"confounder prior {prior!r}; choose one of {PRIORS}")
        seen = self.counts > 0
        if not seen.all():
            names = list(class_names) if class_names is not None else None
            missing = [names[i] if names else i for i in np.flatnonzero(~seen)]
            log.warning(
                "no training image contains class(es) %s: their confounder is all zeros", missing
            )
        centers = np.zeros_like(self.sums)
        centers[seen] = self.sums[seen] / self.counts[seen, None, None]
        n = self.num_classes
        if prior == "uniform" or self.counts.sum() == 0:
            p = np.full(n, 1.0 / n)
        else:
            p = self.counts / self.counts.sum()
        return centers.astype(np.float32), p.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The artifact


@dataclass
class Confounders:
    """The confounder set of one round plus every training image's mask encoding m.

    centers (n, h, w) float32; prior (n,) float32; counts (n,) int64 = training images labelled
    with each class; ids / codes (N, h, w) uint8 with m = codes * mask_scale.
    """

    centers: np.ndarray
    prior: np.ndarray
    counts: np.ndarray
    class_names: list[str]
    dataset: str
    ids: list[str]
    codes: np.ndarray
    mask_scale: float = 1.0
    encoding: str = "foreground"
    # Provenance: the context variant the file was built for, where C and m come from.
    context: str = "calibrated"
    c_source: str = "pred"
    m_source: str = "own"
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.centers = np.asarray(self.centers, np.float32)
        self.prior = np.asarray(self.prior, np.float32)
        self.counts = np.asarray(self.counts, np.int64)
        self.codes = np.asarray(self.codes, np.uint8)
        self.ids = [str(i) for i in self.ids]
        self.class_names = [str(c) for c in self.class_names]
        self._index = {image_id: k for k, image_id in enumerate(self.ids)}
        n = self.centers.shape[0]
        if self.centers.ndim != 3 or self.prior.shape != (n,) or self.counts.shape != (n,):
            raise ConfounderError(
                f"inconsistent confounder shapes: centers {self.centers.shape}, prior "
                f"{self.prior.shape}, counts {self.counts.shape}"
            )
        if len(self.class_names) != n:
            raise ConfounderError(f"{len(self.class_names)} class names for {n} confounders")
        if self.codes.shape != (len(self.ids), *self.size):
            raise ConfounderError(
                f"per-image masks {self.codes.shape} do not match {len(self.ids)} ids at "
                f"{self.size}"
            )
        if len(self._index) != len(self.ids):
            raise ConfounderError("duplicate image ids in the per-image masks")

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.centers.shape[1:])  # type: ignore[return-value]

    @property
    def masks(self) -> np.ndarray:
        """All per-image masks m (N, h, w) float32."""
        return self.codes.astype(np.float32) * np.float32(self.mask_scale)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    def mask_for(self, image_id: str) -> np.ndarray:
        """m of one training image, (h, w) float32."""
        k = self._index.get(str(image_id))
        if k is None:
            raise ConfounderError(
                f"image {image_id!r} has no context mask in the confounder set "
                f"({len(self.ids)} images of data set {self.dataset!r}). Fix: rebuild the "
                "confounders by predicting on the split the classifier trains on."
            )
        return self.codes[k].astype(np.float32) * np.float32(self.mask_scale)

    def context_module(
        self,
        proj_dim: int | None = None,
        temperature: float = 10.0,
        generator: torch.Generator | None = None,
        attention: str = "image",
    ) -> ContextModule:
        return build_context_module(
            self.context,
            torch.from_numpy(self.centers),
            torch.from_numpy(self.prior),
            proj_dim=proj_dim,
            temperature=temperature,
            generator=generator,
            attention=attention,
        )

    def with_mean_centers(self) -> Confounders:
        """``conta.c_source=mean``: every c_i replaced by the mean of the c_i of the classes that
        have training images (C without class information; P(c), counts and every m unchanged).
        A control: all the c_i being equal, alpha is uniform and M = that mean for every image.
        (Permuting C across classes is no control: M = sum_i alpha_i P(c_i) c_i does not depend
        on which class a c_i is filed under; tests/models/test_context.py checks this.)"""
        present = self.counts > 0  # none present: every c_i is zeros, and so is their mean
        mean = self.centers[present if present.any() else slice(None)].mean(0)
        centers = np.broadcast_to(mean, self.centers.shape).astype(np.float32)
        return replace(self, centers=centers, c_source="mean")

    def with_shuffled_masks(self, groups: Sequence[Collection[str]], seed: int) -> Confounders:
        """``conta.m_source=shuffled``: every image gets another image's m (a random derangement
        within each group of ids, e.g. train and val); C is unchanged. A control that must not
        help: it keeps M's marginal statistics and breaks its tie to the image."""
        rng = np.random.default_rng(seed)
        codes = self.codes.copy()
        for group in groups:
            rows = np.array([self._index[i] for i in sorted(group) if i in self._index])
            if len(rows) < 2:
                continue
            shift = rng.permutation(len(rows))
            # A cyclic shift over a random order: no image keeps its own m.
            codes[rows[shift]] = self.codes[rows[np.roll(shift, 1)]]
        return replace(self, codes=codes, m_source="shuffled")

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "size": list(self.size),
            "class_names": self.class_names,
            "encoding": self.encoding,
            "mask_scale": self.mask_scale,
            "num_images": len(self.ids),
            "counts": self.counts.tolist(),
            "prior": self.prior.tolist(),
            "context": self.context,
            "c_source": self.c_source,
            "m_source": self.m_source,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """One atomic npz (arrays + metadata) and a JSON copy of the metadata for people."""
        directory = Path(directory)
        path = directory / CONFOUNDERS_FILE
        meta = self.meta()
        atomic_save_npz(
            path,
            centers=self.centers,
            prior=self.prior,
            counts=self.counts,
            ids=np.asarray(self.ids, dtype=np.str_),
            codes=self.codes,
            meta=np.asarray(json.dumps(meta)),
        )
        atomic_write_json(directory / META_FILE, meta)
        return path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expected_dataset: str,
        expected_num_classes: int,
        expected_size: Sequence[int] | None = None,
        expected_context: str | None = None,
    ) -> Confounders:
        path = Path(directory) / CONFOUNDERS_FILE
        fix = (
            "re-run the confounder update (segmenter prediction on the training images) of the "
            "previous round"
        )
        rebuild = f"Fix: {fix}"
        if not path.is_file():
            raise ConfounderError(f"{path} is missing. {rebuild}.")
        src = Source(path, fix, ConfounderError)
        arrays = read_npz(src, {**CONFOUNDER_ARRAYS, "meta": "U"})
        if arrays["meta"].ndim != 0:
            src.fail(f"array 'meta' has shape {arrays['meta'].shape}, expected one JSON string")
        meta = parse_json(str(arrays["meta"]), src, "meta")
        check_fields(meta, META_SCHEMA, src, "meta", optional=META_OPTIONAL)
        if meta["encoding"] not in ENCODINGS:
            src.fail(f"meta['encoding'] is {meta['encoding']!r}, expected one of {ENCODINGS}")
        if meta.get("dataset") != expected_dataset:
            raise ConfounderError(
                f"{path} was built on data set {meta.get('dataset')!r}, this run uses "
                f"{expected_dataset!r}. {rebuild}, or point the run at the right directory."
            )
        n = arrays["centers"].shape[0]
        if n != expected_num_classes:
            raise ConfounderError(
                f"{path} holds {n} confounders but the run has {expected_num_classes} "
                f"foreground classes. {rebuild}."
            )
        if expected_size is not None and tuple(arrays["centers"].shape[1:]) != tuple(
            int(s) for s in expected_size
        ):
            raise ConfounderError(
                f"{path} is at {tuple(arrays['centers'].shape[1:])}, the run expects "
                f"{tuple(expected_size)} (conta.size). {rebuild} at that size, or set the size "
                "to match."
            )
        built_for = meta.get("context", "paper")  # files before the variants were paper's
        if built_for not in CONTEXT_VARIANTS:
            raise ConfounderError(
                f"{path} names an unknown context variant {built_for!r} (known: "
                f"{list(CONTEXT_VARIANTS)}). {rebuild}."
            )
        if expected_context is not None and built_for != expected_context:
            raise ConfounderError(
                f"{path} was built for conta.context={built_for!r}, this run uses "
                f"conta.context={expected_context!r}. Fix: set conta.context={built_for} to "
                "continue that run, or re-run the previous round's confounders stage "
                "(force=[confounders]) for this variant."
            )
        for key in ("centers", "prior"):
            if not np.isfinite(arrays[key]).all():
                raise ConfounderError(f"{path}: {key} contains NaN or inf. {rebuild}.")
        try:
            return cls(
                centers=arrays["centers"],
                prior=arrays["prior"],
                counts=arrays["counts"],
                class_names=meta["class_names"],
                dataset=meta["dataset"],
                ids=arrays["ids"].tolist(),
                codes=arrays["codes"],
                mask_scale=float(meta["mask_scale"]),
                encoding=meta["encoding"],
                context=built_for,
                c_source=meta.get("c_source", "pred"),
                m_source=meta.get("m_source", "own"),
            )
        except ConfounderError as err:  # inconsistent shapes: name the file
            src.fail(str(err), err)


def build_confounders(
    small_preds: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    *,
    num_classes: int,
    size: Sequence[int],
    class_names: Sequence[str],
    dataset: str,
    encoding: Encoding = "foreground",
    prior: Prior = "uniform",
    center_ids: Collection[str] | None = None,
    context: str = "calibrated",
    c_source: str = "pred",
) -> Confounders:
    """The confounder set from each image's class-id map at (h, w) and its multi-hot labels,
    one entry per image id (so duplicates cannot bias the centers). Ids are stored sorted.

    ``center_ids``: the images C averages over (the training split); the others (e.g. val
    images, for the classifier's validation) only get their m. None = all."""
    if set(small_preds) != set(labels):
        raise ValueError("small_preds and labels must cover the same image ids")
    acc = ConfounderAccumulator(num_classes, size)
    ids = sorted(small_preds)
    codes = np.zeros((len(ids), *acc.size), np.uint8)
    scale = 1.0
    for k, image_id in enumerate(ids):
        small = small_preds[image_id]
        if center_ids is None or image_id in center_ids:
            acc.update(small, labels[image_id])
        codes[k], scale = mask_code(small, encoding, num_classes)
    centers, p = acc.finalize(prior, class_names)
    return Confounders(
        centers=centers,
        prior=p,
        counts=acc.counts,
        class_names=list(class_names),
        dataset=dataset,
        ids=ids,
        codes=codes,
        mask_scale=scale,
        encoding=encoding,
        context=context,
        c_source=c_source,
    )


class ContextMaskDataset(Dataset):
    """Adds ``context_mask`` (h, w) float32 = m of the sample's image to every sample of a data
    set whose samples carry an ``id`` (the WSSS readers do)."""

    def __init__(self, dataset: Dataset, confounders: Confounders, key: str = "context_mask"):
        self.dataset = dataset
        self.confounders = confounders
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.dataset[i])
        sample[self.key] = torch.from_numpy(self.confounders.mask_for(sample["id"]))
        return sample

    def __getattr__(self, name: str):
        # Keep the wrapped set's attributes (class_names, ids, ...) reachable.
        if name in ("dataset", "confounders", "key"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def missing_ids(confounders: Confounders, ids: Iterable[str]) -> list[str]:
    """Ids with no context mask, to check a split before a long training run."""
    return [i for i in ids if i not in confounders]
