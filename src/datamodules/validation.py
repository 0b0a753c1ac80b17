"""Input checks for the data set readers: every failure names the file and the fix.

The readers call these at construction (``validate=True``) so that a wrong path or a broken file
stops the run before any training, instead of surfacing as a worker crash or a silently wrong
label. Images are decoded once at setup (a truncated JPEG passes PIL's ``verify``, which reads
no JPEG data), and the result cached with the labels; masks are decoded only when the labels
are derived from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from src.datamodules.palette import IGNORE_INDEX, read_label_png
from src.utils.errors import UserError

log = logging.getLogger(__name__)

EMPTY_LABEL_POLICIES = ("error", "skip")
# Errors PIL raises on a broken or truncated file.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)
_SHOW = 5  # how many offending files an error lists


class DatasetError(UserError, ValueError):
    """A data set on disk does not match what the config says; the message names file and fix."""


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return shown + more


def check_root(root: str | os.PathLike, key: str = "data.root") -> Path:
    """The data set folder must exist; say which config key points at it."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"data set root {path} does not exist (or is not a folder). "
            f"Fix: set `{key}=/path/to/dataset` on the command line or in conf/data/."
        )
    return path


def check_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} {path} not found. Fix: {fix}")
    return path


def check_split_not_empty(ids: Sequence[str], source: Path) -> None:
    if not ids:
        raise DatasetError(
            f"split {source} lists no images. Fix: point the split at a non-empty list "
            "(data.splits.<split>) or regenerate the list file."
        )


def check_files_exist(paths: Sequence[Path], ids: Sequence[str], what: str, source: Path) -> None:
    """Every listed id needs its file; report all missing ones at once (one stat per file)."""
    missing = [f"{i} -> {p}" for i, p in zip(ids, paths, strict=True) if not p.is_file()]
    if missing:
        fix = (
            "none of them exist, so check data.root and the folder name in data.splits"
            if len(missing) == len(paths)
            else f"restore the missing files or remove those ids from {source.name}"
        )
        raise DatasetError(
            f"{len(missing)} id(s) listed in {source} have no {what}: {_listing(missing)}. "
            f"Fix: {fix}."
        )


def image_header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, once the whole file decodes; raises DatasetError naming the
    file if PIL cannot identify, verify or decode it. `verify` checks PNG chunks but reads no
    JPEG data, so a truncated JPEG would pass it: the pixels are decoded as well (JPEGs at 1/8
    scale, which still reads every byte of the scan)."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        with Image.open(path) as img:  # a verified image cannot be loaded: open it again
            img.draft(None, (1, 1))  # a no-op for anything but JPEG
            img.load()
    except _DECODE_ERRORS as e:
        raise DatasetError(
            f"image {path} is unreadable or corrupt ({type(e).__name__}: {e}). "
            "Fix: re-extract or re-download this file, or remove its id from the split list."
        ) from e
    return size[1], size[0]


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image as HxWx3 uint8 RGB; grayscale, RGBA and palette images are converted."""
    try:
        with Image.open(path) as img:
            # RGBA: alpha is dropped (no compositing), which matches how VOC/COCO images are used.
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"image {path} not found (was it deleted after setup?)") from e
    except _DECODE_ERRORS as e:
        raise DatasetError(
            f"image {path} could not be decoded ({type(e).__name__}: {e}). "
            "Fix: re-extract or re-download this file, or remove its id from the split list."
        ) from e


def read_label_map(path: Path, what: str = "mask") -> np.ndarray:
    """Decode a label PNG as HxW uint8 indices (palette or grayscale), naming the file on error."""
    try:
        return read_label_png(path)
    except FileNotFoundError as e:
        raise DatasetError(f"{what} {path} not found (was it deleted after setup?)") from e
    except _DECODE_ERRORS as e:
        raise DatasetError(
            f"{what} {path} could not be read as a label map ({type(e).__name__}: {e}). "
            "Fix: regenerate or re-download this file."
        ) from e


def check_mask_values(mask: np.ndarray, path: Path, num_classes: int) -> None:
    """Only 0..num_classes-1 and the ignore index 255 may appear in a mask."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(
            f"mask {path} holds class ids {bad.tolist()} outside 0..{num_classes - 1} "
            f"(255 = ignore is allowed). Fix: check data.num_classes / data.class_names "
            f"({num_classes} classes configured) or that the mask folder is the right one."
        )


def check_same_size(
    image_path: Path, image_hw: tuple[int, int], other_path: Path, other_hw: tuple[int, int]
) -> None:
    if tuple(image_hw) != tuple(other_hw):
        raise DatasetError(
            f"size mismatch: image {image_path} is {image_hw[0]}x{image_hw[1]} (HxW) but "
            f"{other_path} is {other_hw[0]}x{other_hw[1]}. Fix: the mask must be pixel-aligned "
            "with its image; regenerate it or remove the id from the split list."
        )


def check_empty_label_policy(policy: str) -> None:
    if policy not in EMPTY_LABEL_POLICIES:
        raise DatasetError(
            f"on_empty_label={policy!r} is not one of {EMPTY_LABEL_POLICIES}. "
            "Fix: set data.on_empty_label to 'error' or 'skip'."
        )


def apply_empty_label_policy(
    ids: Sequence[str], labels: np.ndarray, policy: str, source: Path
) -> np.ndarray:
    """Indices of the images to keep: 'error' raises on an image without foreground class,
    'skip' drops them and logs the count."""
    empty = np.flatnonzero(labels.sum(axis=1) == 0)
    if empty.size == 0:
        return np.arange(len(ids))
    names = [ids[i] for i in empty]
    if policy == "error":
        raise DatasetError(
            f"{len(names)} image(s) in {source} have no foreground class (image-level label is "
            f"empty): {_listing(names)}. Fix: remove them from the list, or set "
            "data.on_empty_label=skip to drop them."
        )
    log.warning(
        "%s: skipped %d of %d images without a foreground class (data.on_empty_label=skip)",
        source,
        len(names),
        len(ids),
    )
    return np.setdiff1d(np.arange(len(ids)), empty)


def file_signature(paths: Iterable[Path]) -> list[tuple[int, int]]:
    """(size, mtime_ns) per file: cheap to get, and changes whenever a file is rewritten."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((st.st_size, st.st_mtime_ns))
    return out
