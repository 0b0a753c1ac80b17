"""PSA's two labellings (jiwoon-ahn/psa; SEAM's pseudo-mask step, baselines.md §A5).

* **Affinity-training labels** (``infer_cls.py --out_la_crf/--out_ha_crf`` and
  ``VOC12AffDataset``): the max-normalised CAMs get a background score (1 − max_k CAM_k)^α and
  are dense-CRF'd twice, with a low α (4: a large background score, so only confident
  foreground survives) and a high α (32: a small background score, so only confident
  background survives). Label = argmax of the low-α CRF; where it says background → 255
  (unsure); where the high-α CRF says background → 0 (this last rule wins, as in PSA's code).
* **Pseudo-masks** (``infer_aff.py``): the same background score at a third α (16), all
  channels average-pooled to the stride-8 grid, walked with T = column-normalised a^β
  (β = 8) for 2^logt steps (logt = 8), upsampled, argmax.

The walk is the project's sparse flux-form walk (src/postprocess/random_walk.py) with one
change: it takes PSA's per-pair affinities instead of deriving them from a boundary map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .crf import SEC_TEST_CRF, CRFParams, crf_probs
from .path_index import get_path_index
from .random_walk import flux_weights, stack_tall, walk

# psa/tool/imutils.py crf_inference (scale_factor 1, unary -log(score)) is SEC's CRF wrapper at
# test time: gaussian sxy 3 w 3, bilateral sxy 80 srgb 13 w 10, 10 iterations.
PSA_CRF = SEC_TEST_CRF


def _keys(keys: Sequence[int] | np.ndarray, channels: int) -> np.ndarray:
    keys_arr = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys_arr.size != channels:
        raise ValueError(f"{channels} CAM channels but {keys_arr.size} keys")
    if keys_arr.size and (keys_arr.min() < 1 or keys_arr.max() > 254):
        raise ValueError(f"keys must be 1-based class ids in [1, 254], got {keys_arr.tolist()}")
    return keys_arr


def background_score(cams: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's background score (1 − max_k CAM_k)^α, (H, W) float32 from (K, H, W) CAMs.

    1 − max is clipped to [0, 1]: float16 CAMs can exceed 1 by a rounding step, and a negative
    base would give a negative (or, for non-integer α, NaN) score. No class: 1 everywhere."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape[0] == 0:
        return np.ones(cams.shape[1:], np.float32)
    return np.clip(1.0 - cams.max(axis=0), 0.0, 1.0) ** np.float32(alpha)


def crf_with_alpha(
    image: np.ndarray, cams: np.ndarray, alpha: float, params: CRFParams = PSA_CRF
) -> np.ndarray:
    """PSA ``_crf_with_alpha``: the dense CRF of [background score; CAMs], (1 + K, H, W).

    The scores are not a distribution; PSA feeds them to ``unary_from_softmax`` as they are
    (unary = −log of the score clipped to [1e-5, 1]), and so does ``crf_probs``."""
    scores = np.concatenate([background_score(cams, alpha)[None], cams], axis=0)
    return crf_probs(image, scores.astype(np.float32), params)


def combine_crf_labels(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """PSA ``VOC12AffDataset``: label = low-α argmax; low says background → 255; high says
    background → 0 (applied last, so it also overrides low-α foreground). Class ids in, uint8
    out (PSA keeps channel indices; only equality matters to the affinity loss, and class ids
    keep the labels comparable with ground truth for eval_pseudo)."""
    label = np.asarray(low).astype(np.uint8)
    label[low == 0] = 255
    label[high == 0] = 0
    return label


def make_psa_label(
    image: np.ndarray,
    cams: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    low_alpha: float = 4,
    high_alpha: float = 32,
    params: CRFParams = PSA_CRF,
) -> np.ndarray:
    """Confident fg/bg labels of one image from its high-res CAMs; uint8 (H, W) in {0, *keys, 255}.

    ``image``: uint8 (H, W, 3) RGB; ``cams``: (K, H, W) max-normalised CAMs of the image's
    classes (make_cams' ``high_res``); ``keys``: their 1-based class ids."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[1:] != np.asarray(image).shape[:2]:
        raise ValueError(f"cams must be (K, H, W) at the image size, got {cams.shape}")
    if not np.isfinite(cams).all():
        raise ValueError("cams contains NaN or inf")
    keys_arr = _keys(keys, cams.shape[0])
    if keys_arr.size == 0:  # nothing to separate: background (a 1-label CRF decides nothing)
        return np.zeros(cams.shape[1:], np.uint8)
    cams = np.clip(cams, 0.0, None)  # scores must be non-negative; -log clips at 1 anyway
    label_ids = np.concatenate([[0], keys_arr])
    low = label_ids[crf_with_alpha(image, cams, low_alpha, params).argmax(axis=0)]
    high = label_ids[crf_with_alpha(image, cams, high_alpha, params).argmax(axis=0)]
    return combine_crf_labels(low, high)


# -- pseudo-masks: the random walk on AffinityNet's pair affinities --------------------------------
def walk_input(high_res: np.ndarray, alpha: float, stride: int = 8) -> np.ndarray:
    """PSA ``infer_aff``: [(1 − max)^α; CAMs] at full resolution, zero-padded to a multiple of
    ``stride`` and average-pooled to the stride grid: float32 (1 + K, ⌈H/s⌉, ⌈W/s⌉).
    The background is computed before pooling, as in PSA (the power is not linear)."""
    cams = np.clip(np.asarray(high_res, dtype=np.float32), 0.0, None)
    scores = np.concatenate([background_score(cams, alpha)[None], cams], axis=0)
    h, w = scores.shape[1:]
    pad = (0, -w % stride, 0, -h % stride)
    padded = F.pad(torch.from_numpy(scores), pad)
    return F.avg_pool2d(padded[None], stride, stride)[0].numpy()


def pair_inside(h: int, w: int, radius: int, device: torch.device | str | None = None) -> Tensor:
    """(D, h, w) bool: whether p + direction_d lies on the (h, w) grid (directions of
    ``get_path_index(radius)``, all with dy >= 0)."""
    pi = get_path_index(radius)
    rows = torch.arange(h, device=device).view(-1, 1)
    cols = torch.arange(w, device=device).view(1, -1)
    return torch.stack(
        [(rows + dy < h) & (cols + dx >= 0) & (cols + dx < w) for dy, dx in pi.directions.tolist()]
    )


def random_walk_affinity(
    cams: Tensor, aff: Tensor, beta: float = 8, logt: int = 8, radius: int = 5
) -> Tensor:
    """rw = x · T^(2^logt), T = column-normalised a^β (PSA ``infer_aff``), without the N×N matrix.

    ``cams``: (C, h, w) walk input (background channel included); ``aff``: (D, h, w) pair
    affinities on the same grid (:func:`src.models.psa.pair_affinity`). Returns float32
    (C, h, w). The project's walk (random_walk.walk: flux form, O(N) memory); PSA's matrix has a
    self-loop of 1, as flux_weights assumes, and the seeds are not boundary-damped. Every pair
    inside the grid is used; PSA drops the pairs whose source lies in the last 4 rows or the
    first/last 4 columns (its training-time pair index), IRNet does not.
    """
    cams = torch.as_tensor(cams)
    pi = get_path_index(radius)
    if cams.dim() != 3 or aff.shape != (pi.num_directions, *cams.shape[1:]):
        raise ValueError(
            f"cams {tuple(cams.shape)} must be (C, h, w), aff {tuple(aff.shape)} "
            f"({pi.num_directions}, h, w)"
        )
    h, w = cams.shape[1:]
    weights = aff.to(cams.device).double().pow(beta) * pair_inside(h, w, radius, cams.device)
    fwd, bwd = flux_weights(weights, radius)
    return walk(cams, fwd, bwd, 2**logt, radius)


def random_walk_affinity_batch(
    cams: Sequence[Tensor], aff: Sequence[Tensor], beta: float = 8, logt: int = 8, radius: int = 5
) -> list[Tensor]:
    """:func:`random_walk_affinity` of several images, of any grid sizes, in one pass
    (random_walk_batch's trick): each image's pairs that leave its grid are zeroed, and the
    images are stacked vertically with ``radius_floor`` rows of zero affinity between them and
    zero affinity right of the narrower ones (:func:`stack_tall`), so no pair crosses images.
    ``cams``: B tensors (C_b, h_b, w_b); ``aff``: B maps (D, h_b, w_b), e.g. a (B, D, h, w)
    tensor. Returns B float32 tensors (C_b, h_b, w_b)."""
    inside = [a * pair_inside(*a.shape[-2:], radius, a.device) for a in aff]
    gap = get_path_index(radius).radius_floor
    tall_aff, tall_cams, places = stack_tall(inside, cams, gap, fill=0.0)
    rw = random_walk_affinity(tall_cams, tall_aff, beta=beta, logt=logt, radius=radius)
    return [
        rw[: cam.shape[0], top : top + h, :w] for cam, (top, h, w) in zip(cams, places, strict=True)
    ]


def psa_label_from_rw(
    rw: Tensor, keys: Sequence[int] | np.ndarray, image_size: tuple[int, int], stride: int = 8
) -> np.ndarray:
    """PSA ``infer_aff``'s labelling: bilinear upsampling ×stride of rw (1 + K, h, w) (channel 0
    the background), crop to ``image_size``, argmax, mapped through [0, *keys]; uint8 (H, W).
    Unlike IRNet there is no global-max normalisation and no background constant: the
    background channel walked with the classes."""
    rw = torch.as_tensor(rw)
    keys_arr = _keys(keys, rw.shape[0] - 1)
    height, width = image_size
    if height > stride * rw.shape[1] or width > stride * rw.shape[2]:
        raise ValueError(f"image_size {image_size} larger than {stride}x the grid {rw.shape[1:]}")
    up = F.interpolate(rw[None].float(), scale_factor=stride, mode="bilinear", align_corners=False)[
        0, :, :height, :width
    ]
    pred = up.argmax(dim=0).cpu().numpy()
    return np.concatenate([[0], keys_arr])[pred].astype(np.uint8)
