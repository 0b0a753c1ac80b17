"""IRNet random walk (``propagate_to_edge``) and the semantic pseudo-label it yields.

The reference builds a dense N×N transition matrix T (N = h·w at stride 4), squares it
``exp_times`` times and computes rw = x · T^(2^exp_times): O(N²) memory, O(N³) time.
T has at most 69 non-zeros per column (radius 5), so :func:`random_walk` applies x ← x · T
2^exp_times times as a spatially varying stencil over the 34 one-sided pair directions
instead (associativity: x·T^256 = (…(x·T)·T…)·T): O(N) memory, O(N) per step, no N×N matrix.
Both are exact up to rounding; :func:`random_walk_dense` is kept as the test/bench reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .path_index import affinity_from_boundary, get_path_index


def _check_inputs(cams: Tensor, boundary: Tensor) -> tuple[Tensor, Tensor]:
    cams = torch.as_tensor(cams)
    boundary = torch.as_tensor(boundary, device=cams.device)
    if cams.dim() != 3:
        raise ValueError(f"cams must be (C, h, w), got {tuple(cams.shape)}")
    if boundary.dim() == 3 and boundary.shape[0] == 1:
        boundary = boundary[0]  # IRNet's EdgeDisplacement returns (1, h, w)
    if boundary.shape != cams.shape[1:]:
        raise ValueError(
            f"boundary {tuple(boundary.shape)} does not match cams {tuple(cams.shape)}"
        )
    return cams, boundary


def _pair_affinity(boundary: Tensor, radius: int) -> Tensor:
    """(D, h, w) affinity between pixel p and p + direction_d; 0 when p + d leaves the image.

    The boundary is padded with 1.0 left/right/bottom like the reference, so pairs leaving
    the image get affinity exactly 0 (their destination is on their own path). Inside the
    image the padding is never on a path (paths stay within the pair's bounding box).
    """
    pi = get_path_index(radius)
    rf = pi.radius_floor
    h, w = boundary.shape
    padded = F.pad(boundary[None], (rf, rf, 0, rf), value=1.0)[0]
    return affinity_from_boundary(padded, pi).view(-1, h, w)


def random_walk_dense(
    cams: Tensor,
    boundary: Tensor,
    beta: float = 10,
    exp_times: int = 8,
    radius: int = 5,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference IRNet ``propagate_to_edge`` with the dense N×N transition matrix.

    ``cams``: (C, h, w) stride-4 CAMs; ``boundary``: (h, w) or (1, h, w) in [0, 1].
    Returns rw (C, h, w) = (CAM ⊙ (1 − B)) · T^(2^exp_times), T = column-normalised a^β.
    Needs ~2 N² floats; for tests and benchmarks only.
    """
    cams, boundary = _check_inputs(cams, boundary)
    c, h, w = cams.shape
    n = h * w
    pi = get_path_index(radius)
    # Reference layout: pad by `radius` left/right/bottom, pairs on the padded grid, crop.
    hp, wp = h + radius, w + 2 * radius
    padded = F.pad(boundary.to(dtype)[None], (radius, radius, 0, radius), value=1.0)[0]
    aff = affinity_from_boundary(padded, pi).reshape(-1)
    src, dst = pi.pairs(hp, wp, cams.device)
    src = src.view(1, -1).expand_as(dst).reshape(-1)
    dst = dst.reshape(-1)

    def to_cropped(idx: Tensor) -> tuple[Tensor, Tensor]:
        row, col = idx // wp, idx % wp - radius
        return row * w + col, (row < h) & (col >= 0) & (col < w)

    src_c, src_ok = to_cropped(src)
    dst_c, dst_ok = to_cropped(dst)
    keep = src_ok & dst_ok
    src_c, dst_c, aff = src_c[keep], dst_c[keep], aff[keep]

    a = torch.zeros(n, n, dtype=dtype, device=cams.device)
    a[src_c, dst_c] = aff
    a[dst_c, src_c] = aff
    a.diagonal().fill_(1.0)
    trans = a.pow_(beta)
    trans /= trans.sum(dim=0, keepdim=True)
    del a
    for _ in range(exp_times):
        trans = trans @ trans
    x = (cams.to(dtype) * (1 - boundary.to(dtype))).reshape(c, n)
    return (x @ trans).view(c, h, w)


def _flux_weights(boundary: Tensor, beta: float, radius: int) -> tuple[Tensor, Tensor]:
    """IRNet's pair weights A = a^β, a from the boundary map (see :func:`flux_weights`)."""
    return flux_weights(_pair_affinity(boundary.double(), radius).pow_(beta), radius)


def flux_weights(weights: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """Normalised pair weights, both (D, h, w) and indexed by the pair's source p.

    ``weights[d, p] = A[p, p+d]`` (0 when p + d is outside the image); returns
    ``fwd[d, p] = A[p, p+d] / deg[p]`` and ``bwd[d, p] = A[p, p+d] / deg[p+d]``, with deg the
    column sums of A (self-loop of 1 included, so deg >= 1). Computed in float64 and rounded
    once: a float32 degree sum biases every column of T the same way, and that bias compounds
    over 256 steps.
    """
    pi = get_path_index(radius)
    rf = pi.radius_floor
    aff = weights.double()
    h, w = aff.shape[1:]
    # deg[p] = 1 + Σ_d A[p, p+d] + Σ_d A[p−d, p]; the second sum shifts each map by +d.
    big = F.pad(aff, (rf, rf, rf, rf))
    deg = 1 + aff.sum(0)
    for i, (dy, dx) in enumerate(pi.directions.tolist()):
        deg += big[i, rf - dy : rf - dy + h, rf - dx : rf - dx + w]
    deg_big = F.pad(deg, (rf, rf, rf, rf), value=1.0)
    deg_dst = torch.stack(
        [deg_big[rf + dy : rf + dy + h, rf + dx : rf + dx + w] for dy, dx in pi.directions.tolist()]
    )
    return aff / deg, aff / deg_dst


def random_walk(
    cams: Tensor,
    boundary: Tensor,
    beta: float = 10,
    exp_times: int = 8,
    radius: int = 5,
) -> Tensor:
    """Sparse IRNet random walk: same result as :func:`random_walk_dense`, O(N) memory.

    ``cams``: (C, h, w) stride-4 CAMs (torch tensor, any device; numpy accepted);
    ``boundary``: (h, w) or (1, h, w) boundary probabilities. Returns float32 (C, h, w) on the
    cams' device. Applies x ← x · T 2^exp_times times, all classes at once, in flux form:
    y[p] = x[p] + Σ_d fwd[d,p]·(x[p+d] − x[p]) + Σ_d bwd[d,p−d]·(x[p−d] − x[p])
    (T's columns sum to 1). Summing differences instead of 69 positive terms keeps float32
    rounding from piling up over 256 steps (error ~1e-6 vs float64, the plain sum ~1e-4).
    Each step costs 3·D vectorised ops over (C, N) (D = 34 directions for radius 5).
    """
    cams, boundary = _check_inputs(cams, boundary)
    fwd, bwd = _flux_weights(boundary, beta, radius)
    return walk(cams.float() * (1 - boundary.float()), fwd, bwd, 2**exp_times, radius)


def walk(x0: Tensor, fwd: Tensor, bwd: Tensor, steps: int, radius: int) -> Tensor:
    """x ← x · T, `steps` times, for all channels of ``x0`` (C, h, w) at once; T given by the
    :func:`flux_weights` of its pair weights. Shared by IRNet's walk and PSA's (SEAM)."""
    pi = get_path_index(radius)
    rf = pi.radius_floor
    c, h, w = x0.shape
    # Flat layout: rows of `width` = w + 2·rf (zero columns both sides) and a zero margin of
    # rf rows + rf elements at both ends, so p ± d stays in bounds as a plain 1-D shift.
    width = w + 2 * rf
    n = h * width
    base = rf * width + rf
    core = slice(base, base + n)
    shifts = [dy * width + dx for dy, dx in pi.directions.tolist()]

    def flat(t: Tensor) -> Tensor:
        return F.pad(t, (rf, rf)).reshape(-1, n).float()

    fwd, bwd = flat(fwd.to(x0.device)), flat(bwd.to(x0.device))  # indexed by the pair's source p

    bufs = [x0.new_zeros(c, n + 2 * base, dtype=torch.float32) for _ in range(2)]
    diff = x0.new_zeros(c, n, dtype=torch.float32)
    bufs[0][:, core].view(c, h, width)[..., rf : rf + w] = x0.float()

    for step in range(steps):
        x, y = bufs[step % 2], bufs[(step + 1) % 2]
        y[:, core] = 0  # accumulate the small flux terms alone, add x once at the end
        for i, s in enumerate(shifts):
            torch.sub(x[:, base + s : base + s + n], x[:, core], out=diff)
            y[:, core].addcmul_(diff, fwd[i])
            y[:, base + s : base + s + n].addcmul_(diff, bwd[i], value=-1)
        y[:, core] += x[:, core]
    out = bufs[steps % 2][:, core].view(c, h, width)[..., rf : rf + w]
    return out.contiguous()


def pseudo_label_from_rw(
    rw: Tensor,
    keys: Sequence[int] | np.ndarray,
    image_size: tuple[int, int],
    bg_threshold: float = 0.25,
) -> np.ndarray:
    """IRNet ``make_sem_seg_labels`` labelling of a random-walk result.

    ``rw``: (C, h, w); ``keys``: (C,) 1-based class ids of the CAM channels; ``image_size``:
    (H, W) of the original image (≤ 4h × 4w). Upsamples ×4 bilinearly, crops to H×W, divides by
    the global max, prepends a constant background plane ``bg_threshold``, takes the argmax and
    maps it through [0, *keys]. Returns uint8 (H, W). An all-zero rw (reference: 0/0 → NaN)
    yields background everywhere.
    """
    rw = torch.as_tensor(rw)
    keys_arr = np.asarray(keys, dtype=np.int64).reshape(-1)
    if rw.dim() != 3 or rw.shape[0] != keys_arr.size:
        raise ValueError(
            f"rw {tuple(rw.shape)} must be (C, h, w) with C = len(keys) = {keys_arr.size}"
        )
    height, width = image_size
    if height > 4 * rw.shape[1] or width > 4 * rw.shape[2]:
        raise ValueError(
            f"image_size {image_size} larger than 4x the rw grid {tuple(rw.shape[1:])}"
        )
    up = F.interpolate(rw[:, None].float(), scale_factor=4, mode="bilinear", align_corners=False)
    up = up[:, 0, :height, :width]
    peak = up.max()
    if peak > 0:
        up = up / peak
    scores = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_threshold)
    pred = scores.argmax(dim=0).cpu().numpy()
    return np.concatenate([[0], keys_arr])[pred].astype(np.uint8)


def stack_tall(
    maps: Sequence[Tensor], channels: Sequence[Tensor], gap: int, fill: float
) -> tuple[Tensor, Tensor, list[tuple[int, int, int]]]:
    """Images of any sizes as one tall grid for a batched walk: ``maps`` (the per-pair input:
    B tensors (..., h_b, w_b), leading dims shared) stacked top to bottom with ``gap`` rows of
    ``fill`` between them and ``fill`` right of the narrower ones; ``channels`` (B walk inputs
    (C_b, h_b, w_b)) likewise, with zeros. Returns the two tall tensors (float32) and each
    image's (top, h, w) in them."""
    if len(maps) != len(channels) or len(maps) == 0:
        raise ValueError(
            f"need as many walk inputs as maps (>= 1), got {len(channels)}, {len(maps)}"
        )
    shapes = [tuple(m.shape[-2:]) for m in maps]
    for c, shape in zip(channels, shapes, strict=True):
        if tuple(c.shape[-2:]) != shape or len(c.shape) != 3:
            raise ValueError(f"walk input {tuple(c.shape)} is not (C, h, w) on the grid {shape}")
    height = sum(h for h, _ in shapes) + gap * (len(shapes) - 1)
    width = max(w for _, w in shapes)
    first = torch.as_tensor(maps[0])
    tall_maps = first.new_full((*first.shape[:-2], height, width), fill, dtype=torch.float32)
    k = max(int(c.shape[0]) for c in channels)
    tall_channels = first.new_zeros(k, height, width, dtype=torch.float32)
    places, top = [], 0
    for m, c, (h, w) in zip(maps, channels, shapes, strict=True):
        tall_maps[..., top : top + h, :w] = torch.as_tensor(m).to(tall_maps)
        tall_channels[: c.shape[0], top : top + h, :w] = torch.as_tensor(c).to(tall_channels)
        places.append((top, h, w))
        top += h + gap
    return tall_maps, tall_channels, places


def random_walk_batch(
    cams: Sequence[Tensor],
    boundaries: Sequence[Tensor],
    beta: float = 10,
    exp_times: int = 8,
    radius: int = 5,
) -> list[Tensor]:
    """:func:`random_walk` of several images, of any sizes, in one pass (the per-step kernel
    launches of one image, not B of them).

    The images are stacked vertically (:func:`stack_tall`), separated by ``radius_floor`` rows of
    boundary 1 and padded right with boundary 1. A pair's path stays in its bounding box, so a
    pair of one image's cells never leaves that image, and every pair reaching a padding cell
    has it on its path: affinity 0. Each image therefore walks exactly as alone (its extra pairs
    add zeros). Image b's K_b classes sit in channels 0..K_b-1 (the walk is per channel).
    ``cams``: B tensors (K_b, h_b, w_b); ``boundaries``: B maps (h_b, w_b), e.g. a (B, h, w)
    tensor. Returns B tensors (K_b, h_b, w_b).
    """
    gap = get_path_index(radius).radius_floor
    tall_boundary, tall_cams, places = stack_tall(boundaries, cams, gap, fill=1.0)
    rw = random_walk(tall_cams, tall_boundary, beta=beta, exp_times=exp_times, radius=radius)
    return [
        rw[: cam.shape[0], top : top + h, :w] for cam, (top, h, w) in zip(cams, places, strict=True)
    ]
