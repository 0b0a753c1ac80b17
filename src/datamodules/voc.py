"""PASCAL VOC 2012 style reader (also reads the synthetic set), and the sample API shared
with the COCO reader.

Every reader yields ``dict(id, image, mask, label, size, index[, context][, extras...])``:
``image`` float [3,H,W] and ``mask`` long [H,W] after the transform, ``label`` the multi-hot
float [num_classes-1] of foreground classes, ``size`` the original (H, W).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from src.datamodules import validation as V
from src.utils.io import atomic_write_bytes
from src.utils.untrusted import Source, UntrustedFileError, read_npz

log = logging.getLogger(__name__)

# (image id, original (H, W)) -> per-pixel array at that size, e.g. CONTA's context map M.
ExtraLoader = Callable[[str, tuple[int, int]], np.ndarray]
Transform = Callable[..., dict]
_CACHE_VERSION = 1
_CACHE_ARRAYS = {"key": "U", "labels": "fiub", "validated": "b"}


def scan_threads() -> int:
    # PIL releases the GIL while decoding, so threads speed up the one-off mask scan.
    return min(8, os.cpu_count() or 1)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot float32 (num_classes-1,) of the foreground classes present (255 ignored)."""
    counts = np.bincount(mask.reshape(-1), minlength=256)
    return (counts[1:num_classes] > 0).astype(np.float32)


class SegmentationDataset(Dataset, ABC):
    """Shared sample assembly, label caching and empty-label handling of the readers.

    Subclasses set ``ids``, ``class_names``, ``labels``, ``image_paths``, ``context_paths`` and
    implement ``load_mask``.
    """

    ids: list[str]
    class_names: list[str]
    labels: np.ndarray
    image_paths: list[Path]
    context_paths: list[Path] | None

    def __init__(
        self, transform: Transform | None, extras: Mapping[str, ExtraLoader] | None
    ) -> None:
        self.transform = transform
        self.extras = dict(extras or {})
        self.context_paths = None
        self.context_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> np.ndarray:
        """HxWx3 uint8 RGB (grayscale, RGBA and palette images converted)."""
        return V.read_rgb(self.image_paths[i])

    @abstractmethod
    def load_mask(self, i: int) -> np.ndarray:
        """HxW uint8 class ids, 255 = ignore."""

    def load_context(self, i: int) -> np.ndarray | None:
        """HxW uint8 context regions (synthetic set: k = class k's home context), or None."""
        if self.context_paths is None:
            return None
        return V.read_label_map(self.context_paths[i], what="context map")

    def _set_context(self, root: Path, context_dir: str | None) -> None:
        """Context maps ``{context_dir}/{id}.png``; their names (indexed by context id, entry 0
        = none) come from the data set's meta.json when it has a "contexts" list."""
        if context_dir is None:
            return
        self.context_paths = [root / context_dir / f"{i}.png" for i in self.ids]
        try:
            contexts = json.loads((root / "meta.json").read_text()).get("contexts")
        except (OSError, ValueError, AttributeError):
            contexts = None
        if isinstance(contexts, list) and contexts:
            self.context_names = ["none", *map(str, contexts)]

    def _keep(self, keep: np.ndarray) -> None:
        """Restrict every per-image list to the kept indices (after the empty-label policy)."""
        if len(keep) == len(self.ids):
            return
        self.ids = [self.ids[i] for i in keep]
        self.labels = self.labels[keep]
        self.image_paths = [self.image_paths[i] for i in keep]
        if self.context_paths is not None:
            self.context_paths = [self.context_paths[i] for i in keep]
        self._keep_extra(keep)

    def keep_first(self, n: int) -> None:
        """Keep the first n images (data.max_images: a preflight's few images per split)."""
        if n < 1:
            raise V.DatasetError(f"data.max_images={n}: keep at least one image per split")
        self._keep(np.arange(min(n, len(self.ids))))

    def _keep_extra(self, keep: np.ndarray) -> None:
        """Subclass hook for its own per-image lists."""

    # -- label cache ---------------------------------------------------------------------------
    def _cached_labels(
        self,
        cache_dir: str | os.PathLike | None,
        stem: str,
        key: dict,
        build: Callable[[], np.ndarray],
        validate: bool,
    ) -> np.ndarray:
        """Labels from ``cache_dir`` if its key matches (and it was validated when validation is
        asked for), else ``build()`` them and write the cache atomically."""
        payload = {"version": _CACHE_VERSION, "classes": self.class_names, "ids": self.ids, **key}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        cache = None if cache_dir is None else Path(cache_dir) / f"labels_{stem}_{digest[:16]}.npz"
        labels = self._read_cache(cache, digest, need_validated=validate)
        if labels is None:
            labels = build()
            if cache is not None:
                buf = io.BytesIO()
                np.savez(buf, key=np.array(digest), labels=labels, validated=np.array(validate))
                atomic_write_bytes(cache, buf.getvalue())
                log.info("cached image-level labels of %d images to %s", len(self.ids), cache)
        return labels

    def _read_cache(self, cache: Path | None, digest: str, *, need_validated: bool):
        if cache is None or not cache.is_file():
            return None
        try:
            z = read_npz(Source(cache, "none needed, it is rebuilt now"), _CACHE_ARRAYS)
        except UntrustedFileError as e:
            log.warning("ignoring the label cache: %s", e)
            return None
        if str(z["key"]) != digest or (need_validated and not bool(z["validated"])):
            return None
        labels = z["labels"].astype(np.float32)
        if labels.shape != (len(self.ids), self.num_classes - 1):
            return None
        return labels

    def __getitem__(self, i: int) -> dict:
        image = self.load_image(i)
        mask = self.load_mask(i)
        h, w = image.shape[:2]
        targets: dict[str, np.ndarray] = {}
        context = self.load_context(i)
        if context is not None:
            targets["context"] = context
        for name, load in self.extras.items():
            arr = np.asarray(load(self.ids[i], (h, w)))
            if arr.shape[:2] != (h, w):
                raise ValueError(
                    f"extra target {name!r} for image {self.ids[i]} has shape {arr.shape}; it "
                    f"must be at the image size {h}x{w} (resize it in the loader)"
                )
            targets[name] = arr
        if self.transform is not None:
            sample = dict(self.transform(image=image, mask=mask, **targets))
        else:
            # No transform: tensors in the original frame, image scaled to [0, 1].
            sample = {
                "image": torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255.0,
                "mask": torch.from_numpy(mask.astype(np.int64)),
            }
            for name, arr in targets.items():
                t = torch.from_numpy(np.ascontiguousarray(arr))
                sample[name] = t.long() if arr.dtype == np.uint8 else t
        sample.update(
            id=self.ids[i],
            label=torch.from_numpy(self.labels[i].copy()),
            size=torch.tensor([h, w], dtype=torch.long),
            index=i,
        )
        return sample


# An image id names files in flat folders ({id}.jpg, {id}.png): no folder, no extension.
_PLAIN_ID = re.compile(r"[^/\\.\s\x00-\x1f]+")
# deeplab-pytorch's pairs: /JPEGImages/{id}.jpg /SegmentationClassAug/{id}.png (leading / optional)
_PAIR_IMAGE = re.compile(r"/?[^/\s]+/([^/\s]+)\.jpg")
_PAIR_MASK = re.compile(r"/?[^/\s]+/([^/\s]+)\.png")
_LIST_FIX = (
    "list one image id per line (2007_000032), or deeplab-pytorch pairs "
    "(/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png); ids name files in the "
    "image and mask folders, without folders or extensions"
)


def _list_error(path: Path, line_no: int, problem: str, fix: str = _LIST_FIX) -> V.DatasetError:
    return V.DatasetError(f"{path}, line {line_no}: {problem}. Fix: {fix}")


def _line_id(tokens: list[str], path: Path, line_no: int) -> str:
    if len(tokens) == 1:
        image_id = tokens[0]
    elif len(tokens) == 2:
        image, mask = _PAIR_IMAGE.fullmatch(tokens[0]), _PAIR_MASK.fullmatch(tokens[1])
        if image is None or mask is None or image[1] != mask[1]:
            raise _list_error(
                path, line_no, f"{' '.join(tokens)[:120]!r} is not an image/mask pair"
            )
        image_id = image[1]
    else:
        raise _list_error(path, line_no, f"{len(tokens)} fields, expected an id or a pair")
    # Taken as written, never rewritten: `sub/x` or `x.v5` would otherwise silently become `x`.
    if not _PLAIN_ID.fullmatch(image_id):
        raise _list_error(path, line_no, f"{image_id[:120]!r} is not a plain image id")
    return image_id


def parse_id_list(path: Path) -> list[str]:
    """Ids from a VOC list file: bare ids (``2007_000032``) or deeplab-pytorch style pairs
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``). A line in neither
    form, an id with a folder or an extension, a repeated id or a file that is not UTF-8 is a
    DatasetError naming the file and the line."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _list_error(
                    path, line_no, f"not UTF-8 text ({err.reason})", "save the list as UTF-8"
                ) from err
            tokens = line.split()
            if not tokens:
                continue
            image_id = _line_id(tokens, path, line_no)
            if image_id in first_line:
                raise _list_error(
                    path,
                    line_no,
                    f"id {image_id!r} repeats line {first_line[image_id]} (it would count twice)",
                    "list each image once",
                )
            first_line[image_id] = line_no
            ids.append(image_id)
    return ids


class VOCSegmentation(SegmentationDataset):
    """VOC layout: ``{image_dir}/{id}.jpg``, ``{mask_dir}/{id}.png`` and a list file of ids.

    ``labels`` are derived from the masks on the first build and cached in ``cache_dir``
    (npz keyed by root, list file, ids and the size/mtime of every image and mask file), so a
    later build reads no mask pixels. A cache written with ``validate=True`` also records that
    the files passed validation; unchanged files are then not re-opened.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str,
        mask_dir: str,
        class_names: Sequence[str],
        *,
        image_dir: str = "JPEGImages",
        context_dir: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        transform: Transform | None = None,
        on_empty_label: str = "error",
        validate: bool = True,
        extras: Mapping[str, ExtraLoader] | None = None,
    ) -> None:
        super().__init__(transform, extras)
        V.check_empty_label_policy(on_empty_label)
        self.root = V.check_root(root)
        self.class_names = list(class_names)
        if len(self.class_names) < 2:
            raise V.DatasetError(
                f"class_names {self.class_names} must list background and at least one class "
                "(data.class_names)"
            )
        self.list_path = V.check_file(
            self.root / list_file,
            "split list file",
            "check data.splits.<split>.list (relative to data.root) and that the ImageSets "
            "folder was extracted (VOC train_aug needs ImageSets/SegmentationAug/train_aug.txt).",
        )
        self.mask_dir = self.root / mask_dir
        ids = parse_id_list(self.list_path)
        V.check_split_not_empty(ids, self.list_path)
        self.ids = ids
        self.image_paths = [self.root / image_dir / f"{i}.jpg" for i in ids]
        self.mask_paths = [self.mask_dir / f"{i}.png" for i in ids]
        self._set_context(self.root, context_dir)
        self.mask_reads = 0  # masks decoded by this instance (tests check the cache with it)

        V.check_files_exist(self.image_paths, ids, "image", self.list_path)
        V.check_files_exist(self.mask_paths, ids, f"mask in {self.mask_dir}", self.list_path)
        if self.context_paths is not None:
            V.check_files_exist(self.context_paths, ids, "context map", self.list_path)

        key = {
            "root": str(self.root.resolve()),
            "list": str(self.list_path.resolve()),
            "masks": str(self.mask_dir.resolve()),
            "files": V.file_signature(
                self.image_paths + self.mask_paths + (self.context_paths or [])
            ),
        }
        self.labels = self._cached_labels(
            cache_dir, self.list_path.stem, key, lambda: self._scan(validate), validate
        )
        self._keep(
            V.apply_empty_label_policy(self.ids, self.labels, on_empty_label, self.list_path)
        )

    # -- masks ---------------------------------------------------------------------------------
    def load_mask(self, i: int) -> np.ndarray:
        """HxW uint8 class ids (palette PNG read as indices; 255 = ignore)."""
        self.mask_reads += 1
        return V.read_label_map(self.mask_paths[i])

    def keep_first(self, n: int) -> None:
        """Keep the first n images (data.max_images: a preflight's few images per split)."""
        if n < 1:
            raise V.DatasetError(f"data.max_images={n}: keep at least one image per split")
        self._keep(np.arange(min(n, len(self.ids))))

    def _keep_extra(self, keep: np.ndarray) -> None:
        self.mask_paths = [self.mask_paths[i] for i in keep]

    def _scan_one(self, i: int, validate: bool) -> np.ndarray:
        mask = V.read_label_map(self.mask_paths[i])
        if validate:
            image_hw = V.image_header_size(self.image_paths[i])
            V.check_same_size(self.image_paths[i], image_hw, self.mask_paths[i], mask.shape)
            V.check_mask_values(mask, self.mask_paths[i], self.num_classes)
            if self.context_paths is not None:
                ctx_hw = V.image_header_size(self.context_paths[i])
                V.check_same_size(self.image_paths[i], image_hw, self.context_paths[i], ctx_hw)
        return labels_from_mask(mask, self.num_classes)

    def _scan(self, validate: bool) -> np.ndarray:
        """Decode every mask once: labels, plus the checks when validating."""
        with ThreadPoolExecutor(scan_threads()) as pool:
            rows = list(pool.map(lambda i: self._scan_one(i, validate), range(len(self.ids))))
        self.mask_reads += len(rows)  # counted here: the threads above share this instance
        return np.stack(rows).astype(np.float32)
