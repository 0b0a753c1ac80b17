"""IRNet's PathIndex: pixel pairs within a radius and the line path between them.

Semantics follow ``misc/indexing.py`` of jiwoon-ahn/irn:

* ``radius`` r searches every offset (dy, dx) with dx² + dy² < r², keeping one side only
  (dy > 0, or dy == 0 and dx > 0); the mirrored half is implied by symmetry. r=10 gives
  152 directions (IRN training at 128×128), r=5 gives 34 (random walk).
* ``radius_floor`` = ceil(r) − 1 is the largest |dy|, |dx| reached. On an (h, w) grid the
  *sources* are the pixels of rows [0, h − rf) and columns [rf, w − rf), so every destination
  ``src + (dy, dx)`` lies inside the grid. Sources are flattened row-major: S = (h−rf)(w−2rf).
* The *path* of a direction is the set of pixels in the bounding box of (0, 0) and (dy, dx)
  whose perpendicular distance to the line is < 1; it contains both endpoints and is ordered
  destination first. Affinity a_ij = 1 − max_{k on path} B_k for a boundary map B.
* Directions are ordered as IRNet's ``path_dst``: grouped by path length (ascending), search
  order inside a group. Every per-pair tensor here is laid out (…, D, S) in that order, the
  layout of IRNet's ``aff`` output and of ``GetAffinityLabelFromIndices``' labels.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Pairs(NamedTuple):
    """Flat (row-major) pixel indices of every (source, destination) pair on an (h, w) grid.

    ``src``: (S,) int64; ``dst``: (D, S) int64 with ``dst[d, s] = src[s] + dy_d * w + dx_d``.
    Pair labels for the affinity loss: ``label.view(-1)[src][None]`` vs ``label.view(-1)[dst]``.
    """

    src: Tensor
    dst: Tensor


def _search_directions(radius: int) -> list[tuple[int, int]]:
    # IRNet's search order: the dy == 0 row first, then rows dy = 1 .. rf.
    rf = math.ceil(radius) - 1
    dirs = [(0, dx) for dx in range(1, rf + 1)]
    for dy in range(1, rf + 1):
        dirs += [(dy, dx) for dx in range(-rf, rf + 1) if dx * dx + dy * dy < radius**2]
    return dirs


def _line_path(dy: int, dx: int) -> np.ndarray:
    """Pixels within distance < 1 of the segment (0,0)–(dy,dx), destination first."""
    length_sq = dy * dy + dx * dx
    coords = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 / length_sq < 1
    ]
    # Stable sort by decreasing |y| + |x|, exactly as IRNet (ties keep scan order).
    coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
    return np.asarray(coords, dtype=np.int64)


class PathIndex:
    """Search directions and line paths for one radius; grid-dependent indices are cached.

    Get instances through :func:`get_path_index` so they are built once per radius. Attributes:

    * ``radius``, ``radius_floor`` (rf): see the module docstring.
    * ``directions``: (D, 2) int64 array of (dy, dx) in IRNet ``path_dst`` order.
    * ``paths``: tuple of D arrays (L_d, 2), the path offsets of each direction
      (``paths[d][0] == directions[d]``, ``paths[d][-1] == (0, 0)``).
    """

    def __init__(self, radius: int):
        if radius < 2:
            raise ValueError(f"radius must be >= 2, got {radius}")
        self.radius = radius
        self.radius_floor = math.ceil(radius) - 1
        paths = [_line_path(dy, dx) for dy, dx in _search_directions(radius)]
        # Python's sort is stable: groups by path length, search order inside a group.
        paths.sort(key=len)
        self.paths: tuple[np.ndarray, ...] = tuple(paths)
        self.directions = np.stack([p[0] for p in paths])

    @property
    def num_directions(self) -> int:
        return len(self.paths)

    def source_shape(self, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of the source region on an (h, w) grid; S = rows * cols."""
        rf = self.radius_floor
        if h <= rf or w <= 2 * rf:
            raise ValueError(
                f"grid {h}x{w} too small for radius {self.radius} (need h>{rf}, w>{2 * rf})"
            )
        return h - rf, w - 2 * rf

    @functools.lru_cache(maxsize=32)  # noqa: B019 - instances are themselves cached for good
    def pairs(self, h: int, w: int, device: torch.device | str | None = None) -> Pairs:
        """Source and destination flat indices on an (h, w) grid (IRNet ``default_src/dst``)."""
        ch, cw = self.source_shape(h, w)
        rf = self.radius_floor
        rows = torch.arange(ch, dtype=torch.int64).view(-1, 1)
        cols = torch.arange(rf, rf + cw, dtype=torch.int64).view(1, -1)
        src = (rows * w + cols).reshape(-1)
        delta = torch.as_tensor(self.directions[:, 0] * w + self.directions[:, 1])
        dst = src.view(1, -1) + delta.view(-1, 1)
        return Pairs(src.to(device), dst.to(device))

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def path_indices(self, h: int, w: int) -> tuple[Tensor, ...]:
        """IRNet's ``default_path_indices``: per path-length group an (n_g, L_g, S) int64
        tensor of flat grid indices along each path. Only needed for IRNet-style gathers;
        :func:`affinity_from_boundary` does not use it (it slices, which needs no index memory).
        """
        src = self.pairs(h, w).src
        groups: dict[int, list[np.ndarray]] = {}
        for p in self.paths:
            groups.setdefault(len(p), []).append(p[:, 0] * w + p[:, 1])
        return tuple(
            src.view(1, 1, -1) + torch.as_tensor(np.stack(g)).unsqueeze(-1)
            for _, g in sorted(groups.items())
        )

    def displacement_targets(self) -> Tensor:
        """IRNet ``path_dst2``: (1, 2, D, 1) float offsets (dy, dx) of every direction."""
        return torch.as_tensor(self.directions.T, dtype=torch.float32).view(1, 2, -1, 1)

    def to_displacement(self, x: Tensor) -> Tensor:
        """IRNet ``to_displacement``: (B, C, H, W) field -> (B, C, D, S) of x[src] − x[dst]."""
        ch, cw = self.source_shape(x.shape[-2], x.shape[-1])
        rf = self.radius_floor
        src = x[..., :ch, rf : rf + cw]
        dst = torch.stack(
            [x[..., dy : dy + ch, rf + dx : rf + dx + cw] for dy, dx in self.directions.tolist()],
            dim=2,
        )
        return (src.unsqueeze(2) - dst).flatten(-2)


@functools.cache
def get_path_index(radius: int) -> PathIndex:
    """The shared :class:`PathIndex` for ``radius`` (built once per process)."""
    return PathIndex(radius)


def affinity_from_boundary(boundary: Tensor, path_index: PathIndex) -> Tensor:
    """Pair affinities a = 1 − max_{k on path} B_k (IRNet ``edge_to_affinity``).

    ``boundary``: (H, W) or (B, H, W) tensor of boundary probabilities (sigmoid output), any
    device/dtype. Returns (D, S) or (B, D, S), aligned with ``path_index.pairs(H, W)``.
    Differentiable: the gradient of each max goes to one arg-max pixel, as with IRNet's
    ``max_pool2d``. Implemented with shifted views (no index tensors), so it works unchanged
    on CPU/CUDA and needs memory only for the output and one direction at a time.
    """
    if boundary.dim() not in (2, 3):
        raise ValueError(f"boundary must be (H, W) or (B, H, W), got {tuple(boundary.shape)}")
    ch, cw = path_index.source_shape(boundary.shape[-2], boundary.shape[-1])
    rf = path_index.radius_floor
    out = []
    for path in path_index.paths:
        views = [boundary[..., dy : dy + ch, rf + dx : rf + dx + cw] for dy, dx in path.tolist()]
        out.append(1 - torch.stack(views, dim=-3).max(dim=-3).values)
    return torch.stack(out, dim=-3).flatten(-2)
