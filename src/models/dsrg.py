"""DSRG (Huang et al., CVPR 2018): deep seeded region growing and its balanced seeding loss
(baselines.md A4, speedinghzl/DSRG ``pylayers.py``: ``generate_seed_step`` used by
``UpdateSeedLayer3`` with ``th1: 0.99, th2: 0.85``, and ``SeedLossLayer3``).

One DSRG training step, with the shared SEC/DSRG pieces from ``src.models.seeded``::

    probs = floored_softmax(logits)                   # SEC/DSRG softmax (+1e-4, renormalised)
    crf = crf_targets(...)                            # CRF-refined probs, a constant target
    grown = grow_batch(crf, cues, labels)             # grows from the ORIGINAL cues every step
    loss = balanced_seeding_loss(probs, grown) + constrain_loss(probs, crf, clip=(0.05, 20))

There is no expansion (GWRP) loss. The boundary loss is SEC's constrain loss with the ratio
Q/f clipped to [0.05, 20]; it lives in ``seeded.py`` and is not repeated here.

Region growing (``region_grow``), per image, over the image's classes only (background forced):

1. c* = argmax P, p* = max P per pixel (ties go to the lower class index, like ``np.argmax``).
2. Candidate label c* where p* > ``fg_threshold`` (c* foreground) or p* > ``bg_threshold``
   (c* background); strict ``>`` as in the official code.
3. For each present class c: the region map is c's original seeds OR the pixels whose candidate
   is c; take its 8-connected components and keep those that contain a seed of c.
4. Return original seeds OR kept pixels.

Decisions where the description is silent or the official code differs from the paper:

- **c's own seeds are part of c's region map**, even where the CRF is not confident. The paper
  grows from the seeds into confident neighbours, and the official code initialises its label map
  with the cues, so a confident region that merely touches (8-connected) a seed is added.
- **Seeds of another class block.** A pixel that is a seed of any other class (and not of c) is
  never added to c and, by default (``cut_at_other_seeds=True``), is removed from c's region map
  *before* labelling components, so it cuts connectivity: the paper's growth only visits
  unlabelled neighbours. The official code labels components first and only then drops such
  pixels, so they do not cut; ``cut_at_other_seeds=False`` gives that behaviour.
- Not reproduced official-code quirks: its label map lets a confident candidate overwrite a seed
  of another class, so that seed no longer anchors its own class (here seeds always anchor); it
  only excludes pixels that are seeds of exactly one other class (here: of any other class).
- Classes absent from the image never grow; their original seeds (if the cues have any) are
  returned unchanged and still block other classes.
- A non-seed pixel is added to at most one class (the candidate map is single-valued).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

BG_THRESHOLD = 0.99  # DSRG th1
FG_THRESHOLD = 0.85  # DSRG th2
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_threshold(name: str, value: float) -> None:
    """Thresholds compare against probabilities: outside [0, 1] nothing (or everything) grows."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value} must be a probability in [0, 1]")


def candidate_labels(
    probs: np.ndarray,
    present: np.ndarray,
    bg_threshold: float = BG_THRESHOLD,
    fg_threshold: float = FG_THRESHOLD,
) -> np.ndarray:
    """(h, w) int map of each pixel's confident class among the present ones, -1 where none.

    The argmax runs over present classes only, so an absent class can never win a pixel, however
    high its probability; background needs ``bg_threshold``, foreground ``fg_threshold``.
    """
    classes = np.flatnonzero(present)
    selected = probs[classes]
    best = classes[selected.argmax(0)]
    peak = selected.max(0)
    threshold = np.where(best == 0, bg_threshold, fg_threshold)
    return np.where(peak > threshold, best, -1)


def _validate_image(probs: np.ndarray, seeds: np.ndarray, present: np.ndarray) -> None:
    """Shape checks for one image, naming the argument at fault."""
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {probs.shape}")
    if probs.shape[0] < 2:
        raise ValueError(f"probs needs background + >= 1 foreground class, got C={probs.shape[0]}")
    if seeds.shape != probs.shape:
        raise ValueError(f"seeds must match probs {probs.shape}, got shape {seeds.shape}")
    if present.shape != probs.shape[:1]:
        raise ValueError(f"present must be ({probs.shape[0]},), got shape {present.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf")


def region_grow(
    probs: np.ndarray,
    seeds: np.ndarray,
    present: np.ndarray,
    bg_threshold: float = BG_THRESHOLD,
    fg_threshold: float = FG_THRESHOLD,
    *,
    cut_at_other_seeds: bool = True,
) -> np.ndarray:
    """DSRG's seeded region growing for one image (see the module docstring for the rules).

    ``probs`` (C, h, w) CRF-refined probabilities, class 0 = background; ``seeds`` (C, h, w) the
    ORIGINAL localization cues (pass the cues every step, never the previous output, or seeds
    accumulate); ``present`` (C,) the image's classes (background is forced present). Returns a
    new bool (C, h, w) array that is a superset of ``seeds``; the inputs are not modified.
    """
    probs = np.asarray(probs, dtype=np.float64)
    seeds = np.asarray(seeds).astype(bool)
    present = np.asarray(present).astype(bool).copy()
    _validate_image(probs, seeds, present)
    _check_threshold("bg_threshold", bg_threshold)
    _check_threshold("fg_threshold", fg_threshold)
    present[0] = True

    candidate = candidate_labels(probs, present, bg_threshold, fg_threshold)
    seed_count = seeds.sum(0)
    grown = seeds.copy()
    for c in np.flatnonzero(present):
        own = seeds[c]
        other = (seed_count - own) > 0
        other &= ~own  # a pixel seeded as c and as another class still belongs to c
        region = own | (candidate == c)
        if cut_at_other_seeds:
            region &= ~other
        components, count = ndimage.label(region, structure=EIGHT_CONNECTED)
        if count == 0:
            continue
        anchored = np.unique(components[own & region])
        anchored = anchored[anchored > 0]
        grown[c] |= np.isin(components, anchored) & ~other
    return grown


@torch.no_grad()
def grow_batch(
    probs: torch.Tensor,
    seeds: torch.Tensor,
    labels: torch.Tensor,
    bg_threshold: float = BG_THRESHOLD,
    fg_threshold: float = FG_THRESHOLD,
    *,
    cut_at_other_seeds: bool = True,
) -> torch.Tensor:
    """``region_grow`` over a batch: ``probs`` (B, C, h, w) CRF-refined, ``seeds`` (B, C, h, w)
    the original cues, ``labels`` (B, C) multi-hot with column 0 = background (forced present).

    Growing is a discrete, gradient-free step (DSRG's layer has no backward), so it runs on CPU
    numpy image by image and returns a bool tensor on ``probs.device``.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, C, h, w), got shape {tuple(probs.shape)}")
    if seeds.shape != probs.shape:
        raise ValueError(
            f"seeds must match probs {tuple(probs.shape)}, got shape {tuple(seeds.shape)}"
        )
    if labels.shape != probs.shape[:2]:
        raise ValueError(
            f"labels must be (B, C) = {tuple(probs.shape[:2])} with column 0 = background, "
            f"got shape {tuple(labels.shape)}"
        )
    p = probs.detach().float().cpu().numpy()
    s = seeds.detach().cpu().numpy().astype(bool)
    present = (labels.detach().float().cpu() > 0.5).numpy()
    grown = [
        region_grow(
            p[i],
            s[i],
            present[i],
            bg_threshold,
            fg_threshold,
            cut_at_other_seeds=cut_at_other_seeds,
        )
        for i in range(p.shape[0])
    ]
    return torch.from_numpy(np.stack(grown)).to(probs.device)


def balanced_seeding_loss(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """DSRG's balanced seeding loss (``SeedLossLayer3``), a scalar.

    Per image: -(sum of log p_0 over background seed pixels) / their count, plus -(sum of log p_c
    over foreground seed entries, c >= 1) / their count; an empty term is 0 (the code divides by
    max(count, 1e-4)), never NaN. Averaged over the batch. Balancing stops the usually much larger
    background cue set from dominating. ``probs`` should be the floored softmax: a seed entry
    with p = 0 gives an infinite loss, as in the original.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, C, h, w), got shape {tuple(probs.shape)}")
    if probs.shape[1] < 2:
        raise ValueError(f"probs needs background + >= 1 foreground class, got C={probs.shape[1]}")
    if seeds.shape != probs.shape:
        raise ValueError(
            f"seeds must match probs {tuple(probs.shape)}, got shape {tuple(seeds.shape)}"
        )
    seeds = seeds.to(device=probs.device, dtype=torch.bool)
    # log(1) = 0 off the seeds: no 0 * log(0) NaN in the value or the gradient
    log_p = torch.log(torch.where(seeds, probs, torch.ones_like(probs)))
    bg_sum = log_p[:, 0].sum((1, 2))
    fg_sum = log_p[:, 1:].sum((1, 2, 3))
    bg_count = seeds[:, 0].sum((1, 2)).clamp_min(1)
    fg_count = seeds[:, 1:].sum((1, 2, 3)).clamp_min(1)
    return -(bg_sum / bg_count + fg_sum / fg_count).mean()


def seed_share(seeds: torch.Tensor) -> torch.Tensor:
    """(B,) share of each image's pixels that carry at least one seed label."""
    if seeds.dim() != 4:
        raise ValueError(f"seeds must be (B, C, h, w), got shape {tuple(seeds.shape)}")
    return seeds.bool().any(1).flatten(1).float().mean(1)


def growth_stats(seeds: torch.Tensor, grown: torch.Tensor) -> dict[str, float]:
    """Batch-mean seeded pixel shares for logging: before and after growth, and the grown seeds
    split into background and foreground (a pixel seeded as both counts in both)."""
    if grown.shape != seeds.shape:
        raise ValueError(
            f"grown must match seeds {tuple(seeds.shape)}, got shape {tuple(grown.shape)}"
        )
    grown = grown.bool()
    return {
        "seeded_before": seed_share(seeds).mean().item(),
        "seeded_after": seed_share(grown).mean().item(),
        "bg_after": grown[:, 0].flatten(1).float().mean(1).mean().item(),
        "fg_after": grown[:, 1:].any(1).flatten(1).float().mean(1).mean().item(),
    }
