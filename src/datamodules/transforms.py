"""Image + per-pixel target transforms (albumentations 2.x), shared by every stage.

A ``SegTransform`` is called as ``t(image=HxWx3 uint8, mask=HxW uint8, **extras)`` and returns
torch tensors: ``image`` float CxHxW (normalised), ``mask`` long HxW, and every extra target.

Order: normalise first, then the geometry. Normalisation is per-pixel and affine, so it commutes
with (bi)linear resampling; doing it first lets the padding fill 0 mean "the mean colour" in
normalised space, as IRNet pads after normalising.

Extra targets ride through the same geometry via albumentations ``additional_targets``:
* ``"label"`` maps (e.g. ``context``, the synthetic context regions) are resampled with nearest
  neighbour and padded with 255 (ignore), like the mask;
* ``"float"`` maps (e.g. ``context_map``, CONTA's M in the image frame, HxW or HxWxC) are
  resampled bilinearly and padded with 0, like the image. The geometry holds no pixel-value
  transform, so treating them as images is exact.
Passing a key that was not declared raises (albumentations would pass it through untransformed).

Randomness: inside ``with sample_seed(s):`` every ``SegTransform`` called restarts its stream
from ``s`` (once per ``with``), so a sample's augmentation is a function of ``s`` alone; the
training loaders (datamodule.py ``training_loader``) give every sample such a seed, drawn in the
main process. Called outside one, a transform continues its own stream (reseeded per DataLoader
worker from torch's worker seed).

``frame_grid`` is the "float" target that records where each pixel came from: (u, v) = its
normalised coordinates in the original image (grid_sample convention, align_corners=False) and
valid = 1, so after the geometry padding reads (0, 0, 0). Coordinates are linear in the pixel
index, so bilinear resampling keeps them exact; CONTA uses it to move M with the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from src.datamodules.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TargetKind = Literal["label", "float"]
# Targets every data set may carry: the synthetic set's ground-truth context regions.
DEFAULT_TARGETS: dict[str, TargetKind] = {"context": "label"}
_ALBU_TYPE = {"label": "mask", "float": "image"}
# (token, seed) of the sample being loaded; a fresh token per `sample_seed` block.
_SAMPLE_SEED: ContextVar[tuple[object, int] | None] = ContextVar("sample_seed", default=None)


@contextmanager
def sample_seed(seed: int) -> Iterator[None]:
    """Every ``SegTransform`` called inside restarts its random stream from ``seed`` (once per
    block: a transform called twice in one block continues its stream)."""
    token = _SAMPLE_SEED.set((object(), int(seed)))
    try:
        yield
    finally:
        _SAMPLE_SEED.reset(token)


def frame_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 (u, v, valid): u = (2x + 1) / W - 1, v = (2y + 1) / H - 1, valid = 1."""
    u = (2.0 * np.arange(width, dtype=np.float32) + 1.0) / width - 1.0
    v = (2.0 * np.arange(height, dtype=np.float32) + 1.0) / height - 1.0
    grid = np.ones((height, width, 3), np.float32)
    grid[..., 0] = u[None, :]
    grid[..., 1] = v[:, None]
    return grid


def load_frame(image_id: str, hw: tuple[int, int]) -> np.ndarray:
    """An extra-target loader (``ExtraTarget("float", load_frame)``); picklable for workers."""
    return frame_grid(int(hw[0]), int(hw[1]))


def _merge_targets(extra_targets: Mapping[str, str] | None) -> dict[str, TargetKind]:
    targets: dict[str, TargetKind] = dict(DEFAULT_TARGETS)
    for name, kind in (extra_targets or {}).items():
        if kind not in _ALBU_TYPE:
            raise ValueError(
                f"extra target {name!r} has kind {kind!r}; use 'label' (nearest, pad 255) or "
                "'float' (bilinear, pad 0)"
            )
        if name in ("image", "mask"):
            raise ValueError(f"extra target name {name!r} is reserved")
        targets[name] = kind  # type: ignore[assignment]
    return targets


def _prepare(name: str, array: np.ndarray, kind: str | None) -> np.ndarray:
    """dtypes OpenCV resamples: float32 for float targets, uint8 for label targets."""
    array = np.asarray(array)
    if kind == "float":
        return array.astype(np.float32, copy=False)
    if kind == "label":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"label target {name!r} must hold ids in 0..255")
        return array.astype(np.uint8, copy=False)
    return array


def _to_tensor(array: np.ndarray, *, channels_first: bool) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and channels_first:
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.int64, copy=False))
    return torch.from_numpy(array.astype(np.float32, copy=False))


class SegTransform:
    """Normalise + optional albumentations geometry + conversion to tensors."""

    def __init__(
        self,
        geometry: Sequence[A.BasicTransform] | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        extra_targets: Mapping[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1) * 255.0
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, -1) * 255.0
        self.targets = _merge_targets(extra_targets)
        self.geometry = None
        self._worker_seed: int | None = None
        self._sample_token: object | None = None
        if geometry:
            self.geometry = A.Compose(
                list(geometry),
                additional_targets={k: _ALBU_TYPE[v] for k, v in self.targets.items()},
                seed=torch.initial_seed() % 2**32 if seed is None else seed,
            )

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed``."""
        if self.geometry is not None:
            self.geometry.set_random_seed(seed % 2**32)

    def _reseed_in_worker(self) -> None:
        # albumentations seeds once at construction, so forked DataLoader workers would all
        # replay the same augmentations. Each worker reseeds from torch's per-worker seed
        # (reproducible under seed_everything), whatever DataLoader or wrapper is used.
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.reseed(info.seed)

    def _reseed(self) -> None:
        active = _SAMPLE_SEED.get()
        if active is None:
            self._reseed_in_worker()
        elif active[0] is not self._sample_token:
            self._sample_token = active[0]
            self.reseed(active[1])

    def normalize(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != self.mean.shape[2]:
            raise ValueError(f"expected an HxWx{self.mean.shape[2]} image, got {image.shape}")
        return (image.astype(np.float32) - self.mean) / self.std

    def __call__(
        self, *, image: np.ndarray, mask: np.ndarray | None = None, **extras: np.ndarray
    ) -> dict[str, torch.Tensor]:
        unknown = sorted(set(extras) - set(self.targets))
        if unknown and self.geometry is not None:
            raise KeyError(
                f"targets {unknown} are not declared for this transform (declared: "
                f"{sorted(self.targets)}); pass them in extra_targets so they follow the geometry"
            )
        self._reseed()
        data = {name: _prepare(name, arr, self.targets.get(name)) for name, arr in extras.items()}
        data["image"] = self.normalize(image)
        if mask is not None:
            data["mask"] = mask
        if self.geometry is not None:
            data = self.geometry(**data)
        out = {"image": _to_tensor(data["image"], channels_first=True)}
        if mask is not None:
            out["mask"] = _to_tensor(data["mask"], channels_first=False)
        for name in extras:
            out[name] = _to_tensor(data[name], channels_first=True)
        return out


def train_transform(
    crop_size: int,
    scale_range: tuple[float, float] | None = (0.5, 1.5),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_long: tuple[int, int] | None = None,
    hflip: bool = True,
    extra_targets: Mapping[str, str] | None = None,
    seed: int | None = None,
    scale_choices: Sequence[float] | None = None,
    color_jitter: Sequence[float] | None = None,
) -> SegTransform:
    """Colour jitter (``color_jitter`` = brightness, contrast, saturation, hue, as SEAM/PSA's
    torchvision ColorJitter; the image only), random rescale (long side ~ U{resize_long} as IRNet; a factor drawn from
    ``scale_choices`` as deeplab-pytorch; else a factor ~ U[scale_range]; none of them: no
    rescale, as PSA), h-flip, pad to ``crop_size`` (image 0 = mean colour, mask 255), random
    crop."""
    if resize_long is not None and scale_choices is not None:
        raise ValueError("give resize_long or scale_choices, not both")
    if scale_choices is not None:
        if not scale_choices or min(scale_choices) <= 0:
            raise ValueError(f"scale_choices must be positive factors, got {scale_choices}")
        # OneOf picks a child uniformly; a RandomScale with equal limits is a fixed factor.
        resize = A.OneOf(
            [
                A.RandomScale(
                    scale_limit=(float(s) - 1.0, float(s) - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
                for s in scale_choices
            ],
            p=1.0,
        )
    elif resize_long is not None:
        lo, hi = (int(v) for v in resize_long)
        if not 0 < lo <= hi:
            raise ValueError(
                f"resize_long must be (min, max) with 0 < min <= max, got {resize_long}"
            )
        # A list of sizes makes LongestMaxSize pick one uniformly: integer U[lo, hi] like IRNet.
        resize = A.LongestMaxSize(
            max_size=list(range(lo, hi + 1)),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
        )
    elif scale_range is not None:
        lo_s, hi_s = (float(v) for v in scale_range)
        if not 0 < lo_s <= hi_s:
            raise ValueError(
                f"scale_range must be (min, max) with 0 < min <= max, got {scale_range}"
            )
        # RandomScale adds 1 to its limits: (lo-1, hi-1) means a factor in [lo, hi].
        resize = A.RandomScale(
            scale_limit=(lo_s - 1.0, hi_s - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        )
    else:
        resize = None
    geometry: list[A.BasicTransform] = []
    if color_jitter is not None:
        brightness, contrast, saturation, hue = (float(v) for v in color_jitter)
        geometry.append(A.ColorJitter(brightness, contrast, saturation, hue, p=1.0))
    if resize is not None:
        geometry.append(resize)
    if hflip:
        geometry.append(A.HorizontalFlip(p=0.5))
    geometry += [
        # IRNet places a small image at a random offset inside the crop container.
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="random",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    return SegTransform(geometry, mean, std, extra_targets, seed)


def val_transform(
    crop_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra_targets: Mapping[str, str] | None = None,
) -> SegTransform:
    """IRNet's validation crop: pad bottom/right to ``crop_size`` then keep the top-left
    ``crop_size`` square, so every sample has one size and batches collate."""
    geometry = [
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.Crop(x_min=0, y_min=0, x_max=crop_size, y_max=crop_size),
    ]
    return SegTransform(geometry, mean, std, extra_targets, seed=0)


def eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra_targets: Mapping[str, str] | None = None,
) -> SegTransform:
    """Full image: normalise and convert to tensors, no geometry."""
    return SegTransform(None, mean, std, extra_targets)
