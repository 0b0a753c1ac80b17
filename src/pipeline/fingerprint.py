"""Content fingerprints of the data a stage reads, so hashes follow content, not paths.

A data folder moved to another disk (or a `paths.data_dir` pointed elsewhere) with the same
files keeps every stage's hash, and editing one val mask redoes only the stages that read val.
A fingerprint digests every file of a split: its id list, images, masks, context maps (VOC
layout) or its annotation file and image folder (COCO). Digests are cached by (path, size,
mtime) in `data.cache_dir`, so a run after the first only stats the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from src.datamodules.voc import parse_id_list
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)
CACHE_FILE = "file_digests.json"
_CHUNK = 1 << 20


def _get(node: Any, key: str, default=None):
    return node.get(key, default) if isinstance(node, Mapping) or hasattr(node, "get") else default


def split_files(data_cfg: Any, split: str) -> list[Path]:
    """Every file whose content defines `split` (in a stable order)."""
    root = Path(str(data_cfg.root))
    spec = data_cfg.splits[split]
    if _get(data_cfg, "format", "voc") == "coco":
        image_dir = root / str(spec.images)
        images = sorted(p for p in image_dir.iterdir() if p.is_file()) if image_dir.is_dir() else []
        return [root / str(spec.annotations), *images]
    list_path = root / str(spec.list)
    ids = parse_id_list(list_path) if list_path.is_file() else []
    files = [list_path]
    for folder, ext in (
        (_get(spec, "images", "JPEGImages"), ".jpg"),
        (_get(spec, "masks"), ".png"),
        (_get(spec, "context"), ".png"),
    ):
        if folder:
            files += [root / str(folder) / f"{i}{ext}" for i in ids]
    meta = root / "meta.json"  # context names of the generated sets
    return files + ([meta] if meta.is_file() else [])


class DigestCache:
    """sha1 of file contents, remembered by (absolute path, size, mtime_ns)."""

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.path = Path(cache_dir) / CACHE_FILE if cache_dir else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, ValueError):
                loaded = {}  # a cache is a shortcut: unreadable means recompute
            if isinstance(loaded, dict):
                self.entries = {
                    k: v
                    for k, v in loaded.items()
                    if isinstance(v, list) and len(v) == 3 and isinstance(v[2], str)
                }

    def digest(self, path: Path) -> str:
        if not path.is_file():
            return "missing"  # the stage itself reports a missing file with its fix
        stat = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            return hit[2]
        sha = hashlib.sha1()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, sha.hexdigest()]
        self.dirty = True
        return sha.hexdigest()

    def save(self) -> None:
        if self.path is not None and self.dirty:
            atomic_write_json(self.path, self.entries)
            self.dirty = False


def data_fingerprints(data_cfg: Any, splits: Iterable[str]) -> dict[str, str]:
    """{split: digest of its files}; file names enter relative to the root, so a moved copy of
    the folder has the same fingerprint."""
    cache = DigestCache(_get(data_cfg, "cache_dir"))
    root = Path(str(data_cfg.root))
    max_images = _get(data_cfg, "max_images")
    out = {}
    for split in dict.fromkeys(splits):
        sha = hashlib.sha1()
        if max_images is not None:  # the first N images of the split are other data
            sha.update(f"max_images\0{int(max_images)}\n".encode())
        files = split_files(data_cfg, split)
        for path in files:
            name = os.path.relpath(path, root)
            sha.update(f"{name}\0{cache.digest(path)}\n".encode())
        out[split] = sha.hexdigest()[:16]
        log.info("data split %s: %d files, fingerprint %s", split, len(files), out[split])
    cache.save()
    return out


def file_digest(path: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> str | None:
    """Content digest of a weights file named in the config (None stays None)."""
    if path in (None, ""):
        return None
    cache = DigestCache(cache_dir)
    digest = cache.digest(Path(str(path)))
    cache.save()
    return digest
