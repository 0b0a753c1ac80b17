"""SEC's localization cues ("seeds") for the seed-driven baselines SEC and DSRG (baselines.md §A3
"Seeds", §A4, §A8), with no external saliency model, on the segmentation network's output grid
(41 x 41 for SEC's 321 x 321 input at stride 8).

* **Foreground** (SEC's foreground notebook): a cell is a cue of class c when its CAM exceeds
  ``threshold`` (0.2) times the class's maximum. Several classes per cell are allowed (SEC's
  multi-label format).
* **Background** (SEC's background notebook): Simonyan gradient saliency of the classifier
  (backpropagate 1s from the class outputs to an intermediate feature map, max |grad| over
  channels, 3 x 3 median filter); the ``fraction`` (10 %) least-salient cells are background.
* **Assembly**: (num_classes, gh, gw) booleans, channel 0 = background, channel c = class id c.
  Where a background cue falls on a foreground cue the foreground wins by default (see
  ``assemble_cues``); ``CueStats`` counts those cells and every labelled class left without a
  foreground cue.
* **Files**: one compressed npz per image (``write_cues`` / ``read_cues``), read back as
  untrusted through an allow-list of arrays, dtypes, shapes and values.

The grid covers the whole image, stretched: SEC resizes the image to 321 x 321 without crop, so
cell (i, j) of a gh x gw grid is the image region [i H/gh, (i+1) H/gh) x [j W/gw, (j+1) W/gw).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

from src.utils.errors import MissingArtifactError
from src.utils.io import atomic_write_bytes
from src.utils.untrusted import Source, read_npz

OVERLAP_RULES = ("foreground", "both")
# What write_cues stores: exactly these arrays, of these dtype kinds (read_npz's allow-list).
CUE_ARRAYS = {"keys": "iu", "cues": "bu", "grid": "iu", "num_classes": "iu", "data_name": "U"}


# -- foreground --------------------------------------------------------------------------------
def _grid(grid: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(g) for g in grid)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"grid must be (gh, gw) with positive sizes, got {tuple(grid)}")
    return size  # type: ignore[return-value]


def _class_ids(labels: Iterable[int] | np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """1-based foreground class ids as int64, each in [1, num_classes - 1], no repeats."""
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    ids = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels)).reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer class ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 1 or ids.max() >= num_classes):
        raise ValueError(
            f"{what} must be 1-based foreground class ids in [1, {num_classes - 1}] "
            f"(0 is the background), got {ids.tolist()}"
        )
    if len(np.unique(ids)) != ids.size:
        raise ValueError(f"{what} repeat a class: {ids.tolist()}")
    return ids


def resize_to_grid(maps: np.ndarray | torch.Tensor, grid: Sequence[int]) -> np.ndarray:
    """(K, h, w) score maps -> float32 (K, gh, gw), bilinear (align_corners=False, antialiased
    when shrinking).

    Bilinear, not nearest: the maps are continuous scores, and bilinear is how make_cams itself
    resizes CAMs (``multiscale_cams``), so cues on the grid agree with the stored CAMs; nearest
    would pick one source pixel per cell, shift cells by up to half a source pixel and let a
    single noisy pixel decide a cell. Antialiasing when shrinking (stride-4 CAMs of a 500 px
    image are ~125 px, the grid 41) makes each cell the weighted mean of the pixels it covers
    instead of a 2 x 2 sample from its middle. The weights are non-negative, so non-negative maps
    stay non-negative."""
    gh, gw = _grid(grid)
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not torch.is_tensor(maps) else maps)
    t = t.detach().float().cpu()
    if t.ndim != 3:
        raise ValueError(f"maps must be (K, h, w), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        return np.zeros((0, gh, gw), np.float32)
    if tuple(t.shape[1:]) == (gh, gw):
        return t.numpy().copy()
    shrink = t.shape[1] > gh or t.shape[2] > gw
    out = F.interpolate(
        t[None], size=(gh, gw), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0].numpy()


def foreground_cues(
    cams: np.ndarray | torch.Tensor,
    keys: Sequence[int] | np.ndarray,
    grid: Sequence[int],
    num_classes: int,
    threshold: float = 0.2,
) -> np.ndarray:
    """SEC's foreground cues: bool (num_classes, gh, gw), channel 0 (background) all False.

    ``cams``: (K, h, w), one map per image class (make_cams' ``cam``, stride 4, any size: it is
    resized to ``grid`` with ``resize_to_grid``); ``keys``: their 1-based class ids;
    ``num_classes`` counts the background. Cell u is a cue of class c when
    cam_c(u) > threshold * max_u cam_c(u), the max taken on the grid (after resizing, so the
    class's peak cell is always a cue). Several classes may share a cell. A class whose map is
    zero everywhere (max <= 0) gets no cue: ``CueStats`` reports it, nothing here fails."""
    gh, gw = _grid(grid)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    maps = resize_to_grid(cams, (gh, gw))
    ids = _class_ids(keys, num_classes, "keys")
    if ids.size != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} CAM channels but {ids.size} keys")
    if not np.isfinite(maps).all():
        raise ValueError("cams contain NaN or inf")
    out = np.zeros((num_classes, gh, gw), dtype=bool)
    for c, cam in zip(ids, maps, strict=True):
        peak = float(cam.max())
        if peak > 0:
            out[c] = cam > threshold * peak
    return out


# -- background ------------------------------------------------------------------------------
@contextmanager
def _grad_from_stage(net: torch.nn.Module, stage: int):
    """While open, backbone stage ``stage`` returns its output as a fresh leaf that requires
    grad (yielded list: the leaves of each call), and every later stage runs with grad enabled.

    CAMNet.features runs stages below ``backbone.frozen_stages`` without grad, which would cut
    the path from the logits back to a stage at or below the frozen ones (IRNet freezes stages
    0-1; a fully frozen backbone has no graph at all). ``frozen_stages`` only gates the grad
    mode in forward (parameters keep their requires_grad), so it is set to ``stage + 1`` for the
    call and restored after: the stages up to ``stage`` run without a graph (nothing below the
    leaf is needed), the later ones with one."""
    backbone = net.backbone
    frozen = backbone.frozen_stages

    leaves: list[torch.Tensor] = []

    def hook(module, inputs, output):
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    handle = backbone.stages[stage].register_forward_hook(hook)
    backbone.frozen_stages = stage + 1
    try:
        yield leaves
    finally:
        backbone.frozen_stages = frozen
        handle.remove()


def _batched(t: torch.Tensor | np.ndarray | None, ndim: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.ndim == ndim - 1:
        t = t[None]
    if t.ndim != ndim or t.shape[0] != 1:
        raise ValueError(f"{what} must be one image, got shape {tuple(t.shape)}")
    return t


def gradient_saliency(
    net: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    grid: Sequence[int],
    stage: int = 2,
    context_mask: torch.Tensor | np.ndarray | None = None,
    frame: torch.Tensor | np.ndarray | None = None,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """Simonyan gradient saliency of one image on the cue grid: float32 (gh, gw), >= 0.

    ``classes``: the logits (0-based foreground indices) whose sum is differentiated; None sums
    all of them, as SEC's "1s from fc8". The pipeline passes the image's own classes: summed
    over every class, the weights of absent classes cancel the evidence of present ones
    (measured on the synthetic set, layer3, 60 images: 26.7 % of the 10 % least salient cells
    were background, below the 76.8 % background share of the grid; with the image's classes
    99.8 %; bench/README "Cues").

    SEC's background notebook: backpropagate 1s from fc8 (i.e. the gradient of the sum of all
    class scores) to conv4_1, max |grad| over channels, 3 x 3 median filter. Here the gradient of
    the sum of the net's class logits (``net(x, context_mask, frame)``: CAMNet's GAP -> class
    conv, or a subclass's own head, e.g. SEAMNet's) is taken w.r.t. the output of backbone stage
    ``stage`` (0 = stem + layer1, 1..2 = layer2..3; not the last, layer4, whose gradient is
    spatially uniform): the stage output that ``net.features(..., return_stages=True)`` lists,
    caught by a forward hook on ``backbone.stages[stage]`` as a leaf, with
    ``torch.autograd.grad`` (no parameter ``.grad`` is touched). Default 2 (layer3's output, the
    input of the last stage): conv4_1 is the first conv of VGG-16's second-to-last block, deep
    enough that its gradient reflects object evidence rather than edges, shallow enough to keep
    a fine grid; layer3's output is ResNet's counterpart (stride 8 for strides (2,2,1,1), 16 for
    IRNet's (2,2,2,1)) and lies above IRNet's frozen stages. The median is taken on the feature
    grid (as SEC, whose conv4_1 grid is the cue grid), then the map is resized to ``grid``
    (``resize_to_grid``).

    ``image``: normalised (3, H, W) or (1, 3, H, W); a CONTA context net also needs the image's
    ``context_mask`` ((h, w) or (1, h, w)) and ``frame`` ((3, H, W) or (1, 3, H, W)), passed
    through to ``net.features``. The net runs in eval mode (switched for the call and restored);
    the pass runs with grad enabled whatever the caller's grad mode."""
    gh, gw = _grid(grid)
    last = len(net.backbone.stages) - 1
    if not 0 <= stage < last:
        raise ValueError(
            f"stage={stage}: use a backbone stage index in [0, {last - 1}]; under GAP and a "
            f"linear class conv the gradient at the last stage ({last}) is the same at every "
            "cell, so it would rank the cells by nothing"
        )
    param = next(net.parameters())
    x = _batched(image, 4, "image").to(param.device, torch.float32)
    mask = _batched(context_mask, 3, "context_mask")
    frame_t = _batched(frame, 4, "frame")
    mask = None if mask is None else mask.to(param.device)
    frame_t = None if frame_t is None else frame_t.to(param.device)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad(), _grad_from_stage(net, stage) as leaves:
            logits = net(x, mask, frame_t)
            if len(leaves) != 1:
                raise RuntimeError(f"backbone stage {stage} ran {len(leaves)} times, expected 1")
            scores = logits if classes is None else logits[:, list(classes)]
            (grad,) = torch.autograd.grad(scores.sum(), leaves[0])
    finally:
        net.train(was_training)
    sal = grad[0].abs().amax(dim=0).float().cpu().numpy()
    sal = median_filter(sal, size=3)
    return np.maximum(resize_to_grid(sal[None], (gh, gw))[0], 0.0)


def background_cues(saliency: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """SEC's background cues: bool (gh, gw), exactly max(1, round(fraction * gh * gw)) of the
    least-salient cells (Python's round, half to even: 0.1 of 41 x 41 = 168.1 -> 168).

    Ties are broken by a stable argsort over the row-major cells: among equal saliencies the
    earlier cell (top rows first, then left) is taken, so the count is exact and the result
    deterministic."""
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.ndim != 2 or sal.size == 0:
        raise ValueError(f"saliency must be a non-empty (gh, gw) map, got shape {sal.shape}")
    if not np.isfinite(sal).all():
        raise ValueError("saliency contains NaN or inf")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = max(1, round(fraction * sal.size))
    order = np.argsort(sal.reshape(-1), kind="stable")[:count]
    out = np.zeros(sal.size, dtype=bool)
    out[order] = True
    return out.reshape(sal.shape)


def assemble_cues(fg: np.ndarray, bg: np.ndarray, overlap: str = "foreground") -> np.ndarray:
    """The cues of one image: bool (num_classes, gh, gw), channel 0 = background.

    ``overlap`` decides a cell that is both a background cue and a foreground cue:
    * "foreground" (default): the foreground cue wins, the background cue is dropped. The
      background comes from a class-agnostic saliency that is 10 % of the grid by construction;
      a foreground cue comes from the class's own CAM. Keeping both would make SEC's seeding
      loss push p_bg and p_c up at the same cell (a contradiction that only adds noise), and
      DSRG's growing excludes cells that are seeds of another class, so such a cell would block
      both classes.
    * "both": keep both, as SEC's multi-label format allows.
    Foreground cues of several classes in one cell are always kept (SEC's format). The overlap
    is counted by ``CueStats`` from the unassembled ``fg`` and ``bg``."""
    fg = np.asarray(fg, dtype=bool)
    bg = np.asarray(bg, dtype=bool)
    if fg.ndim != 3 or bg.shape != fg.shape[1:]:
        raise ValueError(f"fg must be (C, gh, gw) and bg (gh, gw): got {fg.shape}, {bg.shape}")
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap={overlap!r}; choose one of {OVERLAP_RULES}")
    cues = fg.copy()
    cues[0] = bg & ~fg[1:].any(axis=0) if overlap == "foreground" else bg
    return cues


# -- statistics ------------------------------------------------------------------------------
class CueStats:
    """Cue statistics over many images (an accumulator; ``merge`` joins two, e.g. per worker).

    ``update(image_id, fg, bg, labels)`` takes one image's unassembled parts. Cell shares, over
    all cells of all images: ``background`` (a background cue), ``foreground`` (a cue of at least
    one class), ``overlap`` (both: resolved by ``assemble_cues``' rule), ``none`` (no cue);
    background + foreground - overlap + none = 1. ``empty_foreground`` counts the (image,
    labelled class) pairs whose foreground cue is empty (the class gets no seed: SEC's seeding
    loss and DSRG's growing then have nothing for it), per class too, with the first
    ``max_examples`` pairs named. Nothing is dropped or raised for them: report them."""

    def __init__(self, max_examples: int = 20) -> None:
        self.max_examples = int(max_examples)
        self.images = 0
        self.cells = 0
        self.counts = Counter({"background": 0, "foreground": 0, "overlap": 0, "none": 0})
        self.pairs = 0
        self.empty = 0
        self.empty_per_class: Counter[int] = Counter()
        self.examples: list[tuple[str, int]] = []

    def update(
        self, image_id: str, fg: np.ndarray, bg: np.ndarray, labels: Iterable[int] | np.ndarray
    ) -> None:
        fg = np.asarray(fg, dtype=bool)
        bg = np.asarray(bg, dtype=bool)
        if fg.ndim != 3 or bg.shape != fg.shape[1:]:
            raise ValueError(
                f"{image_id}: fg must be (C, gh, gw) and bg (gh, gw): got {fg.shape}, {bg.shape}"
            )
        ids = _class_ids(labels, fg.shape[0], f"{image_id}: labels")
        stray = sorted(
            set((np.flatnonzero(fg[1:].any(axis=(1, 2))) + 1).tolist()) - set(ids.tolist())
        )
        if stray:
            raise ValueError(
                f"{image_id}: foreground cues for classes {stray} not among its labels "
                f"{ids.tolist()}"
            )
        any_fg = fg[1:].any(axis=0)
        self.images += 1
        self.cells += bg.size
        self.counts["background"] += int(bg.sum())
        self.counts["foreground"] += int(any_fg.sum())
        self.counts["overlap"] += int((bg & any_fg).sum())
        self.counts["none"] += int((~bg & ~any_fg).sum())
        self.pairs += ids.size
        for c in ids.tolist():
            if not fg[c].any():
                self._add_empty(str(image_id), c)

    def _add_empty(self, image_id: str, c: int) -> None:
        self.empty += 1
        self.empty_per_class[c] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((image_id, c))

    def merge(self, other: CueStats) -> CueStats:
        self.images += other.images
        self.cells += other.cells
        self.counts.update(other.counts)
        self.pairs += other.pairs
        self.empty += other.empty
        self.empty_per_class.update(other.empty_per_class)
        room = max(0, self.max_examples - len(self.examples))
        self.examples += other.examples[:room]
        return self

    def summary(self) -> dict[str, Any]:
        """Plain values for DONE.json / results."""
        cells = max(self.cells, 1)
        return {
            "images": self.images,
            "cells": self.cells,
            **{f"{k}_share": self.counts[k] / cells for k in self.counts},
            "labelled_pairs": self.pairs,
            "empty_foreground": self.empty,
            "empty_foreground_per_class": {
                str(c): n for c, n in sorted(self.empty_per_class.items())
            },
            "empty_foreground_examples": [[i, c] for i, c in self.examples],
        }


def cue_stats(
    records: Iterable[tuple[str, np.ndarray, np.ndarray, Iterable[int]]], max_examples: int = 20
) -> dict[str, Any]:
    """``CueStats`` over (image_id, fg, bg, labels) records, summarised."""
    stats = CueStats(max_examples)
    for image_id, fg, bg, labels in records:
        stats.update(image_id, fg, bg, labels)
    return stats.summary()


# -- files -----------------------------------------------------------------------------------
def write_cues(
    path: str | Path,
    cues: np.ndarray,
    labels: Iterable[int] | np.ndarray,
    *,
    data_name: str,
    num_classes: int,
) -> None:
    """One image's cues as a compressed npz, written atomically.

    ``cues``: bool (num_classes, gh, gw), channel 0 = background (``assemble_cues``);
    ``labels``: the image's 1-based foreground class ids. Stored: ``keys`` int16 (K,) = 0 then
    the sorted labels; ``cues`` bool (K, gh, gw), those channels; ``grid`` int32 (2,);
    ``num_classes`` int32 (); ``data_name`` str (). A cue of a class not among the labels is an
    error (it would be lost)."""
    cues = np.asarray(cues)
    if cues.ndim != 3 or cues.shape[0] != num_classes:
        raise ValueError(f"cues must be ({num_classes}, gh, gw), got shape {cues.shape}")
    if cues.dtype != bool:
        if cues.dtype.kind not in "iu" or not np.isin(cues, (0, 1)).all():
            raise ValueError(f"cues must be boolean (or 0/1), got dtype {cues.dtype}")
        cues = cues.astype(bool)
    if not isinstance(data_name, str) or not data_name:
        raise ValueError(f"data_name must be a non-empty string, got {data_name!r}")
    ids = np.sort(_class_ids(labels, num_classes, "labels"))
    keys = np.concatenate([[0], ids]).astype(np.int16)
    dropped = sorted(set(np.flatnonzero(cues.any(axis=(1, 2))).tolist()) - set(keys.tolist()))
    if dropped:
        raise ValueError(
            f"{path}: cues for classes {dropped} that are not among the image's labels "
            f"{ids.tolist()}"
        )
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        keys=keys,
        cues=np.ascontiguousarray(cues[keys.astype(np.int64)]),
        grid=np.asarray(cues.shape[1:], dtype=np.int32),
        num_classes=np.asarray(num_classes, dtype=np.int32),
        data_name=np.asarray(data_name),
    )
    atomic_write_bytes(path, buf.getvalue())


def read_cues(
    path: str | Path,
    *,
    data_name: str,
    num_classes: int,
    grid: Sequence[int],
    labels: Iterable[int] | np.ndarray | None = None,
    producer: str,
) -> np.ndarray:
    """One image's cues from ``write_cues``' file: bool (num_classes, gh, gw).

    The file is untrusted: exactly the arrays of ``CUE_ARRAYS``, of their dtype kinds and shapes,
    keys 0 then distinct foreground ids, 0/1 cues. It must be from this data set
    (``data_name``, ``num_classes``), at this ``grid``, and, with ``labels`` (the image's 1-based
    class ids), hold exactly the image's classes. Anything else raises MissingArtifactError
    naming the file and the fix (re-run ``producer``)."""
    path = Path(path)
    gh, gw = _grid(grid)
    rerun = f"re-run {producer} (force=[{producer}])"
    if not path.is_file():
        raise MissingArtifactError(f"cue file {path} is missing. Fix: {rerun}")
    src = Source(path, f"delete it and {rerun}", MissingArtifactError)
    arrays = read_npz(src, CUE_ARRAYS)
    name, n, stored_grid = arrays["data_name"], arrays["num_classes"], arrays["grid"]
    keys, cues = arrays["keys"], arrays["cues"]
    if name.shape != () or n.shape != () or stored_grid.shape != (2,):
        src.fail(
            f"data_name, num_classes and grid have shapes {name.shape}, {n.shape}, "
            f"{stored_grid.shape}; expected (), (), (2,)"
        )
    if str(name) != data_name or int(n) != num_classes:
        raise MissingArtifactError(
            f"{path} holds cues of data set {str(name)!r} with {int(n)} classes, this run uses "
            f"{data_name!r} with {num_classes}. Fix: {rerun} for this data set, or point the run "
            "at the right directory."
        )
    if keys.ndim != 1 or cues.ndim != 3 or cues.shape != (keys.size, *stored_grid.tolist()):
        src.fail(
            f"keys {keys.shape} and cues {cues.shape} do not fit each other and grid "
            f"{stored_grid.tolist()}"
        )
    if tuple(stored_grid.tolist()) != (gh, gw):
        raise MissingArtifactError(
            f"{path} holds cues on a {tuple(stored_grid.tolist())} grid, this run expects "
            f"{(gh, gw)} (the segmenter's output grid). Fix: {rerun} at this grid size."
        )
    if cues.dtype.kind == "u" and cues.size and cues.max() > 1:
        src.fail(f"cues hold values up to {int(cues.max())}, expected 0/1")
    k = keys.astype(np.int64)
    if k.size == 0 or k[0] != 0 or (k[1:] < 1).any() or (k >= num_classes).any():
        src.fail(
            f"keys {k.tolist()} are not 0 (background) then class ids in [1, {num_classes - 1}]"
        )
    if len(np.unique(k)) != k.size:
        src.fail(f"keys {k.tolist()} repeat a class")
    if labels is not None:
        want = sorted(_class_ids(labels, num_classes, "labels").tolist())
        if sorted(k[1:].tolist()) != want:
            raise MissingArtifactError(
                f"{path} holds cues for classes {sorted(k[1:].tolist())} but the image's classes "
                f"are {want}: the cues were made from other labels (another split or label "
                f"file). Fix: delete it and {rerun}."
            )
    out = np.zeros((num_classes, gh, gw), dtype=bool)
    out[k] = cues.astype(bool)
    return out
