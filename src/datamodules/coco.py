"""COCO instances reader: instance annotations -> semantic masks with VOC-style ids.

* Category ids (non-contiguous: COCO's 80 classes use 1..90) map to 1..K in sorted id order;
  ``class_names`` are the json category names with "background" first.
* Mask rule: crowd regions are painted 255 (ignore) first, then the non-crowd instances from the
  largest to the smallest pixel area, so a smaller instance (usually the one in front, e.g. a
  rider on a horse) ends on top; at equal area the later annotation wins. Instances therefore
  overwrite crowd regions: a labelled person inside a crowd box stays labelled.
* Masks are rasterised on first use and cached as palette PNGs (atomic temp + rename, safe
  across DataLoader workers and DDP ranks) under ``cache_dir/masks_{ann}_{hash}``, the hash
  covering the annotation file's path, size and mtime so an edited json never reuses stale masks.
* Image-level labels come from the non-crowd annotations (as COCO WSSS label files do), so no
  mask needs rasterising at construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from src.datamodules import validation as V
from src.datamodules.palette import IGNORE_INDEX, save_label_png
from src.datamodules.voc import ExtraLoader, SegmentationDataset, Transform, scan_threads

log = logging.getLogger(__name__)


def load_coco(path: Path) -> COCO:
    """pycocotools COCO index; its progress prints go to the debug log."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            coco = COCO(str(path))
    except json.JSONDecodeError as e:
        raise V.DatasetError(
            f"annotation file {path} is not valid JSON ({e}). Fix: re-download or regenerate it."
        ) from e
    except (KeyError, TypeError, AttributeError) as e:
        raise V.DatasetError(
            f"annotation file {path} is not in COCO instances format (missing or malformed "
            f"{e}). Fix: point data.splits.<split>.annotations at an instances_*.json file."
        ) from e
    log.debug("%s", out.getvalue().strip())
    for key in ("images", "categories"):
        if key not in coco.dataset:
            raise V.DatasetError(
                f"annotation file {path} has no '{key}' list, so it is not a COCO instances "
                "file. Fix: point data.splits.<split>.annotations at an instances_*.json file."
            )
    return coco


def segmentation_to_mask(segm, h: int, w: int) -> np.ndarray:
    """COCO polygon list / uncompressed RLE / RLE -> HxW uint8 {0,1}."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    with warnings.catch_warnings():
        # pycocotools' Cython decode predates numpy 2's copy keyword and warns on every call;
        # harmless, and silenced only here.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def rasterise(anns: list[tuple[int, bool, object]], h: int, w: int) -> np.ndarray:
    """Semantic mask from (label, iscrowd, segmentation) triples by the rule in the module doc."""
    mask = np.zeros((h, w), dtype=np.uint8)
    instances = []
    for label, crowd, segm in anns:
        m = segmentation_to_mask(segm, h, w).astype(bool)
        if crowd:
            mask[m] = IGNORE_INDEX
        else:
            instances.append((label, m))
    # Stable sort: equal areas keep annotation order, so the later one is painted last.
    for label, m in sorted(instances, key=lambda x: -int(x[1].sum())):
        mask[m] = label
    return mask


def _file_digest(path: Path) -> str:
    st = path.stat()
    sig = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(sig.encode()).hexdigest()[:16]


class COCOSegmentation(SegmentationDataset):
    """COCO 2014 (or the synthetic set's COCO export) with the shared sample API."""

    def __init__(
        self,
        root: str | os.PathLike,
        image_dir: str,
        ann_file: str,
        *,
        cache_dir: str | os.PathLike | None,
        transform: Transform | None = None,
        on_empty_label: str = "error",
        validate: bool = True,
        context_dir: str | None = None,
        extras: Mapping[str, ExtraLoader] | None = None,
    ) -> None:
        super().__init__(transform, extras)
        V.check_empty_label_policy(on_empty_label)
        self.root = V.check_root(root)
        self.ann_path = V.check_file(
            self.root / ann_file,
            "COCO annotation file",
            "check data.splits.<split>.annotations (relative to data.root); COCO 2014 needs "
            "annotations/instances_train2014.json and instances_val2014.json.",
        )
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise V.DatasetError(
                f"image folder {self.image_dir} not found. Fix: check "
                "data.splits.<split>.images (relative to data.root), e.g. train2014."
            )
        if cache_dir is None:
            raise V.DatasetError(
                f"COCO masks for {self.ann_path} are rasterised into a cache folder, but none is "
                "set. Fix: set data.cache_dir to a writable folder."
            )
        coco = load_coco(self.ann_path)
        self.category_ids = sorted(coco.cats)
        self.cat_to_label = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.class_names = ["background"] + [coco.cats[c]["name"] for c in self.category_ids]
        unknown = sorted({a["category_id"] for a in coco.anns.values()} - set(self.cat_to_label))
        if unknown:
            raise V.DatasetError(
                f"annotation file {self.ann_path} uses category ids {unknown} that are not in "
                "its 'categories' list. Fix: add them to 'categories' or drop those annotations."
            )

        image_ids = sorted(coco.imgs)
        V.check_split_not_empty(image_ids, self.ann_path)
        infos = [coco.imgs[i] for i in image_ids]
        self.ids = [Path(info["file_name"]).stem for info in infos]
        self.image_paths = [self.image_dir / info["file_name"] for info in infos]
        self.image_sizes = [(int(info["height"]), int(info["width"])) for info in infos]
        # Only what rasterising needs; dropping the COCO index keeps worker copies small.
        self.annotations = [
            [
                (self.cat_to_label[a["category_id"]], bool(a.get("iscrowd", 0)), a["segmentation"])
                for a in coco.imgToAnns.get(i, [])
            ]
            for i in image_ids
        ]
        del coco
        self._set_context(self.root, context_dir)
        V.check_files_exist(self.image_paths, self.ids, f"image in {self.image_dir}", self.ann_path)
        if self.context_paths is not None:
            V.check_files_exist(self.context_paths, self.ids, "context map", self.ann_path)

        ann_digest = _file_digest(self.ann_path)
        self.mask_dir = Path(cache_dir) / f"masks_{self.ann_path.stem}_{ann_digest}"
        self.masks_rasterised = 0  # masks built by this instance (tests check the cache with it)
        key = {
            "ann": ann_digest,
            "files": V.file_signature(self.image_paths + (self.context_paths or [])),
        }
        self.labels = self._cached_labels(
            cache_dir, self.ann_path.stem, key, lambda: self._scan(validate), validate
        )
        self._keep(V.apply_empty_label_policy(self.ids, self.labels, on_empty_label, self.ann_path))

    def _keep_extra(self, keep: np.ndarray) -> None:
        self.image_sizes = [self.image_sizes[i] for i in keep]
        self.annotations = [self.annotations[i] for i in keep]

    def _scan_one(self, i: int, validate: bool) -> np.ndarray:
        if validate:
            hw = V.image_header_size(self.image_paths[i])
            V.check_same_size(self.image_paths[i], hw, self.ann_path, self.image_sizes[i])
            if self.context_paths is not None:
                ctx_hw = V.image_header_size(self.context_paths[i])
                V.check_same_size(self.image_paths[i], hw, self.context_paths[i], ctx_hw)
        labels = np.zeros(self.num_classes - 1, dtype=np.float32)
        for label, crowd, _ in self.annotations[i]:
            if not crowd:
                labels[label - 1] = 1.0
        return labels

    def _scan(self, validate: bool) -> np.ndarray:
        with ThreadPoolExecutor(scan_threads()) as pool:
            rows = list(pool.map(lambda i: self._scan_one(i, validate), range(len(self.ids))))
        return np.stack(rows)

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}.png"

    def load_mask(self, i: int) -> np.ndarray:
        """HxW uint8 semantic mask, rasterised once and then read from the PNG cache."""
        path = self.mask_path(i)
        if path.is_file():
            return V.read_label_map(path, what="cached COCO mask")
        h, w = self.image_sizes[i]
        try:
            mask = rasterise(self.annotations[i], h, w)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise V.DatasetError(
                f"annotation file {self.ann_path}: the segmentation of image {self.ids[i]} "
                f"cannot be rasterised ({type(e).__name__}: {e}). Fix: repair that annotation."
            ) from e
        save_label_png(path, mask)
        self.masks_rasterised += 1
        return mask
