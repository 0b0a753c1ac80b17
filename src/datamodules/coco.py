"""COCO instances reader: instance annotations -> semantic masks with VOC-style ids.

* Category ids (non-contiguous: COCO's 80 classes use 1..90) map to 1..K in sorted id order;
  ``class_names`` are the json category names with "background" first.
* Mask rule: crowd regions are painted 255 (ignore) first, then the non-crowd instances from the
  largest to the smallest pixel area, so a smaller instance (usually the one in front, e.g. a
  rider on a horse) ends on top; at equal area the later annotation wins. Instances therefore
  overwrite crowd regions: a labelled person inside a crowd box stays labelled.
* Image-level labels come from the non-crowd annotations (as COCO WSSS label files do), so no
  mask needs rasterising at construction.
* Memory does not grow with the annotations: a one-off prepare step (``prepare_coco``; the first
  construction runs it when nobody did) reads the json with pycocotools, checks it, and writes
  an index under ``cache_dir/coco_index_{ann}_{hash}``: ``index.npz`` (file names, sizes,
  image-level labels, categories) and ``segments.bin`` (each image's annotations as compressed
  RLE, one checksummed record per image). The hash covers the annotation file's path, size and
  mtime, so an edited json never reuses a stale index. The data set then holds only ids, image
  paths, sizes, labels and each image's record span; the COCO object is dropped, and nothing
  per annotation is copied into DataLoader workers or DDP ranks.
* Masks are rasterised on first use from that record (pycocotools decode) and cached as palette
  PNGs (atomic temp + rename, safe across workers and ranks) under ``cache_dir/masks_{ann}_
  {hash}``. A cached PNG that is unreadable or of the wrong size or values is rasterised again
  (with a warning); a record failing its checksum stops with the folder to delete.
* Output names: every stage writes ``<id>.png`` / ``<id>.npz`` with the id = the file name's
  stem, so two images whose stems are equal (ignoring case, as on macOS/Windows file systems)
  are refused, as are duplicate image ids and file names that are absolute, contain ``..`` or
  resolve (through a symlink) outside the image folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import warnings
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from src.datamodules import validation as V
from src.datamodules.palette import IGNORE_INDEX, read_label_png, save_label_png
from src.datamodules.voc import ExtraLoader, SegmentationDataset, Transform, scan_threads
from src.utils.io import atomic_save_npz, atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_SHOW = 5  # how many offending entries an error lists
# Index arrays and their numpy dtype kinds; anything else means the file is not ours.
_INDEX_ARRAYS = {
    "version": "iu",
    "ann_digest": "U",
    "category_ids": "iu",
    "class_names": "U",
    "coco_ids": "iu",
    "file_names": "U",
    "sizes": "iu",
    "labels": "u",
    "offsets": "iu",
    "crc": "u",
}
_PNG_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


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


def _decode(rle) -> np.ndarray:
    with warnings.catch_warnings():
        # pycocotools' Cython decode predates numpy 2's copy keyword and warns on every call;
        # harmless, and silenced only here.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def segmentation_to_mask(segm, h: int, w: int) -> np.ndarray:
    """COCO polygon list / uncompressed RLE / RLE -> HxW uint8 {0,1}."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return _decode(rle)


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


def _listing(items: Sequence[object]) -> str:
    shown = "; ".join(str(x) for x in items[:_SHOW])
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return shown + more


# -- file names and output names -------------------------------------------------------------
def file_name_problem(name: object) -> str | None:
    """Why a json ``file_name`` cannot be joined to the image folder, or None when it can
    (lexical checks only; symlinks are checked against the folder by ``check_inside``)."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if "\0" in name:
        return "contains a NUL character"
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or name.startswith(("/", "\\"))
    ):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' component"
    if not PurePosixPath(name).stem:
        return "names no file"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _escape_target(real_dir: str, name: str) -> str | None:
    """Where ``name`` (lexically safe) resolves when a symlink under ``real_dir`` takes it
    outside ``real_dir``, else None. One lstat per component of ``name`` (one for COCO's flat
    folders); the full resolution only when a component is a symlink."""
    current = real_dir
    for part in PurePosixPath(name).parts:
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            return None  # missing: check_files_exist reports it
        if stat.S_ISLNK(mode):
            target = os.path.realpath(os.path.join(real_dir, name))
            return None if _inside(target, real_dir) else target
    return None


def check_file_names(
    file_names: Sequence[str], coco_ids: Sequence[int], ann_path: Path, image_dir: Path | None
) -> None:
    """Refuse file names that are absolute, contain ``..`` or (``image_dir`` given) resolve
    outside the image folder; the error names the json, each image id and its value."""
    bad = [
        f"image id {cid}: file_name {name!r} {problem}"
        for cid, name in zip(coco_ids, file_names, strict=True)
        if (problem := file_name_problem(name)) is not None
    ]
    if not bad and image_dir is not None:
        real_dir = os.path.realpath(image_dir)
        for cid, name in zip(coco_ids, file_names, strict=True):
            target = _escape_target(real_dir, name)
            if target is not None:
                bad.append(
                    f"image id {cid}: file_name {name!r} resolves to {target}, outside the "
                    f"image folder {real_dir}"
                )
    if bad:
        raise V.DatasetError(
            f"annotation file {ann_path}: {len(bad)} image(s) have a file_name that does not "
            f"stay inside the image folder: {_listing(bad)}. Fix: file_name must be a path "
            "relative to data.splits.<split>.images without '..' (copy symlinked files into the "
            "folder, or point the split at the folder that holds them)."
        )


def check_unique_output_names(
    ids: Sequence[str], coco_ids: Sequence[int], file_names: Sequence[str], ann_path: Path
) -> None:
    """Outputs are ``<id>.png`` / ``<id>.npz`` with id = file-name stem: refuse ids that are
    equal, ignoring case (a case-insensitive file system would merge them too)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, name in enumerate(ids):
        groups[name.casefold()].append(k)
    clashes = [
        f"{', '.join(dict.fromkeys(ids[k] for k in g))} <- image ids "
        + ", ".join(f"{coco_ids[k]} ({file_names[k]!r})" for k in g)
        for g in groups.values()
        if len(g) > 1
    ]
    if clashes:
        raise V.DatasetError(
            f"annotation file {ann_path}: {len(clashes)} output name(s) are shared by several "
            f"images, whose masks, CAMs and pseudo labels (<id>.png/.npz, id = file_name stem) "
            f"would overwrite each other: {_listing(clashes)}. Fix: give every image a "
            "file_name with a distinct stem (case-insensitively), or drop the duplicates from "
            "'images'."
        )


# -- the prepare step: json -> index + segment store ------------------------------------------
def _rle_string_covers(counts: bytes, total: int) -> bool:
    """pycocotools' rleFrString in Python: whether the compressed counts are non-negative and
    cover exactly ``total`` pixels (its decode writes them without a bound check)."""
    cnts: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return False
            c = counts[p] - 48
            if not 0 <= c < 64:
                return False
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        if x < 0:
            return False
        cnts.append(x)
    return sum(cnts) == total


def segmentation_to_rle(segm, h: int, w: int) -> bytes:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) of an HxW image as
    compressed RLE counts; ValueError when it is malformed or of another size."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))["counts"]
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError("segmentation is neither a polygon list nor an RLE dict")
    if list(segm["size"]) != [h, w]:
        raise ValueError(f"RLE size {segm['size']} differs from the image's {[h, w]}")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts do not cover the {h}x{w} image")
        return mask_utils.frPyObjects(segm, h, w)["counts"]
    counts = counts.encode() if isinstance(counts, str) else counts
    if not isinstance(counts, bytes) or not _rle_string_covers(counts, h * w):
        raise ValueError(f"compressed RLE counts do not cover the {h}x{w} image")
    return counts


def _positive_int(value: object) -> int | None:
    if type(value) is int and value > 0:
        return value
    if type(value) is float and value.is_integer() and value > 0:
        return int(value)
    return None


def _check_images(images: object, ann_path: Path) -> list[dict]:
    """The json 'images' entries: int ids without duplicates, positive sizes."""
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise V.DatasetError(
            f"annotation file {ann_path}: 'images' is not a list of objects. Fix: point "
            "data.splits.<split>.annotations at an instances_*.json file."
        )
    bad = [
        f"{im.get('id')!r} (entry {k})"
        for k, im in enumerate(images)
        if type(im.get("id")) is not int
        or _positive_int(im.get("height")) is None
        or _positive_int(im.get("width")) is None
    ]
    if bad:
        raise V.DatasetError(
            f"annotation file {ann_path}: {len(bad)} image entries lack an integer 'id' or a "
            f"positive integer 'height'/'width': {_listing(bad)}. Fix: repair those entries."
        )
    counts: dict[int, int] = defaultdict(int)
    for im in images:
        counts[im["id"]] += 1
    dups = [f"{i} ({n}x)" for i, n in counts.items() if n > 1]
    if dups:
        raise V.DatasetError(
            f"annotation file {ann_path}: image ids {_listing(dups)} appear more than once in "
            "'images' (pycocotools would keep only the last entry and give it the annotations "
            "of all of them). Fix: give every image entry a unique id."
        )
    return images


def _build_index(ann_path: Path, folder: Path, digest: str) -> dict[str, np.ndarray]:
    """Read the json once and write ``index.npz`` + ``segments.bin`` to ``folder``."""
    coco = load_coco(ann_path)
    images = _check_images(coco.dataset["images"], ann_path)
    bad_cats = [c for c in coco.cats if type(c) is not int]
    if bad_cats:
        raise V.DatasetError(
            f"annotation file {ann_path}: category ids {_listing(bad_cats)} are not integers. "
            "Fix: use integer ids in 'categories' and in the annotations' category_id."
        )
    category_ids = sorted(coco.cats)
    cat_to_label = {cid: k + 1 for k, cid in enumerate(category_ids)}
    class_names = ["background"] + [str(coco.cats[c].get("name", c)) for c in category_ids]
    unknown = sorted(
        {a.get("category_id") for a in coco.anns.values()} - set(cat_to_label), key=repr
    )
    if unknown:
        raise V.DatasetError(
            f"annotation file {ann_path} uses category ids {unknown} that are not in "
            "its 'categories' list. Fix: add them to 'categories' or drop those annotations."
        )
    infos = sorted(images, key=lambda im: im["id"])
    V.check_split_not_empty(infos, ann_path)
    coco_ids = [im["id"] for im in infos]
    file_names = [im.get("file_name") for im in infos]
    check_file_names(file_names, coco_ids, ann_path, None)
    ids = [PurePosixPath(name).stem for name in file_names]
    check_unique_output_names(ids, coco_ids, file_names, ann_path)

    n, num_cats = len(infos), len(category_ids)
    sizes = np.array(
        [(_positive_int(im["height"]), _positive_int(im["width"])) for im in infos], np.int64
    )
    labels = np.zeros((n, num_cats), np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    crc = np.zeros(n, np.uint32)
    records = []
    for k, cid in enumerate(coco_ids):
        h, w = (int(v) for v in sizes[k])
        rows = []
        for a in coco.imgToAnns.get(cid, []):
            label, crowd = cat_to_label[a["category_id"]], bool(a.get("iscrowd", 0))
            try:
                counts = segmentation_to_rle(a["segmentation"], h, w)
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                raise V.DatasetError(
                    f"annotation file {ann_path}: annotation {a.get('id')!r} of image id {cid} "
                    f"({file_names[k]}) cannot be rasterised ({type(e).__name__}: {e}). Fix: "
                    "repair or drop that annotation."
                ) from e
            rows.append([label, int(crowd), counts.decode("ascii")])
            if not crowd:
                labels[k, label - 1] = 1
        record = json.dumps(rows, separators=(",", ":")).encode()
        records.append(record)
        crc[k] = zlib.crc32(record)
        offsets[k + 1] = offsets[k] + len(record)
    del coco
    index = {
        "version": np.array(INDEX_VERSION),
        "ann_digest": np.array(digest),
        "category_ids": np.array(category_ids, np.int64),
        "class_names": np.array(class_names),
        "coco_ids": np.array(coco_ids, np.int64),
        "file_names": np.array(file_names),
        "sizes": sizes,
        "labels": labels,
        "offsets": offsets,
        "crc": crc,
    }
    # The store first: an index on disk always has its store (ranks writing at once write the
    # same bytes, so any mix of their files is consistent).
    atomic_write_bytes(folder / "segments.bin", b"".join(records))
    atomic_save_npz(folder / "index.npz", **index)
    log.info("prepared the COCO index of %d images from %s in %s", n, ann_path, folder)
    return index


def _read_index(folder: Path, digest: str) -> dict[str, np.ndarray] | None:
    """The index in ``folder`` when it is complete and ours, else None (it is then rebuilt)."""
    path, store = folder / "index.npz", folder / "segments.bin"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if sorted(z.files) != sorted(_INDEX_ARRAYS):
                raise ValueError(f"arrays {sorted(z.files)}")
            index = {k: z[k] for k in _INDEX_ARRAYS}
        for k, kinds in _INDEX_ARRAYS.items():
            if index[k].dtype.kind not in kinds:
                raise ValueError(f"{k} has dtype {index[k].dtype}")
        if int(index["version"]) != INDEX_VERSION or str(index["ann_digest"]) != digest:
            raise ValueError("it belongs to another version or annotation file")
        n, k = len(index["file_names"]), len(index["category_ids"])
        offsets = index["offsets"]
        shapes_ok = (
            index["coco_ids"].shape == (n,)
            and index["sizes"].shape == (n, 2)
            and index["labels"].shape == (n, k)
            and index["class_names"].shape == (k + 1,)
            and offsets.shape == (n + 1,)
            and index["crc"].shape == (n,)
        )
        if not shapes_ok or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise ValueError("its arrays do not fit together")
        if not store.is_file() or store.stat().st_size != offsets[-1]:
            raise ValueError(f"{store} is missing or not {int(offsets[-1])} bytes long")
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("rebuilding the COCO index %s: it is unusable (%s)", path, e)
        return None
    return index


def coco_index_dir(cache_dir: str | os.PathLike, ann_path: Path) -> Path:
    return Path(cache_dir) / f"coco_index_{ann_path.stem}_{_file_digest(ann_path)}"


def prepare_coco(ann_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The one-off step that reads the annotation json (on one process, e.g. rank 0, before the
    data sets are built): writes the index unless a valid one exists; returns its folder."""
    ann_path = V.check_file(
        Path(ann_path), "COCO annotation file", "check data.splits.<split>.annotations."
    )
    folder = coco_index_dir(cache_dir, ann_path)
    digest = folder.name.rsplit("_", 1)[1]
    if _read_index(folder, digest) is None:
        _build_index(ann_path, folder, digest)
    return folder


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
        self.index_dir = coco_index_dir(cache_dir, self.ann_path)
        ann_digest = self.index_dir.name.rsplit("_", 1)[1]
        index = _read_index(self.index_dir, ann_digest)
        if index is None:
            index = _build_index(self.ann_path, self.index_dir, ann_digest)
        self.segments_path = self.index_dir / "segments.bin"

        self.category_ids = [int(c) for c in index["category_ids"]]
        self.cat_to_label = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.class_names = [str(c) for c in index["class_names"]]
        file_names = [str(f) for f in index["file_names"]]
        coco_ids = [int(c) for c in index["coco_ids"]]
        check_file_names(file_names, coco_ids, self.ann_path, self.image_dir)
        self.ids = [PurePosixPath(name).stem for name in file_names]
        check_unique_output_names(self.ids, coco_ids, file_names, self.ann_path)
        self.image_paths = [self.image_dir / name for name in file_names]
        del file_names, coco_ids
        # Small per-image arrays; each image's annotations stay in segments.bin.
        self.image_sizes = index["sizes"].astype(np.int64)
        self._spans = np.stack([index["offsets"][:-1], index["offsets"][1:]], axis=1)
        self._crc = index["crc"].astype(np.uint32)
        index_labels = index["labels"]
        del index

        self._set_context(self.root, context_dir)
        V.check_files_exist(self.image_paths, self.ids, f"image in {self.image_dir}", self.ann_path)
        if self.context_paths is not None:
            V.check_files_exist(self.context_paths, self.ids, "context map", self.ann_path)

        self.mask_dir = Path(cache_dir) / f"masks_{self.ann_path.stem}_{ann_digest}"
        self.masks_rasterised = 0  # masks built by this instance (tests check the cache with it)
        key = {
            "ann": ann_digest,
            "files": V.file_signature(self.image_paths + (self.context_paths or [])),
        }
        self.labels = self._cached_labels(
            cache_dir,
            self.ann_path.stem,
            key,
            lambda: self._scan(index_labels, validate),
            validate,
        )
        self._keep(V.apply_empty_label_policy(self.ids, self.labels, on_empty_label, self.ann_path))

    def _keep_extra(self, keep: np.ndarray) -> None:
        self.image_sizes = self.image_sizes[keep]
        self._spans = self._spans[keep]
        self._crc = self._crc[keep]

    def _check_one(self, i: int) -> None:
        hw = V.image_header_size(self.image_paths[i])
        V.check_same_size(self.image_paths[i], hw, self.ann_path, tuple(self.image_sizes[i]))
        if self.context_paths is not None:
            ctx_hw = V.image_header_size(self.context_paths[i])
            V.check_same_size(self.image_paths[i], hw, self.context_paths[i], ctx_hw)

    def _scan(self, index_labels: np.ndarray, validate: bool) -> np.ndarray:
        if validate:
            with ThreadPoolExecutor(scan_threads()) as pool:
                list(pool.map(self._check_one, range(len(self.ids))))
        return index_labels.astype(np.float32)

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}.png"

    def annotations(self, i: int) -> list[tuple[int, bool, dict]]:
        """Image i's (label, iscrowd, compressed RLE) triples, read from the segment store."""
        start, end = (int(v) for v in self._spans[i])
        try:
            with open(self.segments_path, "rb") as f:
                f.seek(start)
                record = f.read(end - start)
        except OSError as e:
            record, problem = b"", f"cannot be read ({e})"
        else:
            problem = "fails its checksum"
        if len(record) != end - start or zlib.crc32(record) != int(self._crc[i]):
            raise V.DatasetError(
                f"COCO segment store {self.segments_path}: the record of image {self.ids[i]} "
                f"{problem}, so the file is corrupt or was replaced. Fix: delete the folder "
                f"{self.index_dir}; the next run rebuilds it from {self.ann_path}."
            )
        h, w = (int(v) for v in self.image_sizes[i])
        return [
            (int(label), bool(crowd), {"size": [h, w], "counts": counts.encode("ascii")})
            for label, crowd, counts in json.loads(record)
        ]

    def _cached_mask(self, i: int, path: Path) -> np.ndarray | None:
        """The cached PNG when it is a readable label map of this image's size and classes."""
        try:
            mask = read_label_png(path)
        except FileNotFoundError:
            return None
        except _PNG_ERRORS as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        else:
            h, w = (int(v) for v in self.image_sizes[i])
            if mask.shape != (h, w):
                problem = f"{mask.shape[0]}x{mask.shape[1]} instead of {h}x{w}"
            elif ((mask >= self.num_classes) & (mask != IGNORE_INDEX)).any():
                problem = f"holding class ids >= {self.num_classes}"
            else:
                return mask
        log.warning("cached COCO mask %s is %s; rasterising it again", path, problem)
        return None

    def load_mask(self, i: int) -> np.ndarray:
        """HxW uint8 semantic mask, rasterised once and then read from the PNG cache."""
        path = self.mask_path(i)
        mask = self._cached_mask(i, path)
        if mask is not None:
            return mask
        h, w = (int(v) for v in self.image_sizes[i])
        mask = rasterise(self.annotations(i), h, w)
        save_label_png(path, mask)
        self.masks_rasterised += 1
        return mask
