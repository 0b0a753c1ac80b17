"""VOC colour palette and label-map PNG I/O (palette PNGs, atomic writes)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from src.utils.io import atomic_write_bytes

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map as an (n, 3) uint8 array (index 255 is the void colour)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        # VOC devkit's bit-interleaving: bit j of the index lands in bit 7-j' of one channel.
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW label map -> HxWx3 uint8 RGB with the VOC colours."""
    return VOC_PALETTE[np.asarray(mask, dtype=np.uint8)]


def encode_label_png(mask: np.ndarray) -> bytes:
    """Encode an HxW uint8 label map as a palette PNG (indices stored as-is)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"label map must be HxW uint8, got shape {mask.shape} dtype {mask.dtype}")
    # Indices are stored as-is; the palette only makes viewers show the VOC colours.
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(VOC_PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an HxW uint8 label map as a VOC palette PNG, atomically."""
    atomic_write_bytes(path, encode_label_png(mask))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as HxW uint8 indices (palette 'P' or grayscale 'L'; never RGB colours)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: label PNG has mode {img.mode!r}; expected a palette ('P') or grayscale "
                "('L') PNG holding class indices. Convert colour masks to indices first."
            )
        return np.array(img, dtype=np.uint8)
