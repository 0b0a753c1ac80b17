"""Atomic file writes: a temp file in the same folder, then os.replace.

Readers (and a resumed run) never see half a file: a file either exists complete or not at all.
A write that fails because the disk is full or the folder is read-only raises DiskWriteError: one
line naming the file and the fix, the temp file removed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from src.utils.errors import UserError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# A full disk (or quota) and a folder we may not write to: the user's to fix, not a bug.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class DiskWriteError(UserError, OSError):
    """A file could not be written: the disk is full or the folder is read-only. str() is one
    line with the path and the fix; errno, strerror and filename are the OSError's. Build it
    with `disk_write_error`."""

    message = ""

    def __str__(self) -> str:
        return self.message or super().__str__()


# Where our writes go: run outputs, or data and caches (the generated set, label caches).
OUTPUT_SETTINGS = "paths.output_dir (or paths.data_dir for data and caches)"


def disk_write_error(
    err: BaseException,
    path: str | os.PathLike | None = None,
    setting: str = OUTPUT_SETTINGS,
    unnamed: str = "a file (the error names none)",
) -> DiskWriteError | None:
    """`err` as a DiskWriteError when it is a full-disk or read-only-folder OSError (None for any
    other error). `path`: the file being written (default: the one the OSError names, else
    `unnamed`); `setting`: the config key that chooses the folder, named in the fix."""
    if isinstance(err, DiskWriteError):
        return err
    if not isinstance(err, OSError) or err.errno not in (*_FULL, *_READ_ONLY):
        return None
    filename = str(path) if path is not None else err.filename
    clear = DiskWriteError(err.errno, err.strerror, filename)
    if err.errno in _FULL:
        fix = f"free disk space there, or point {setting} at a disk with room"
    else:
        fix = f"point {setting} at a writable folder"
    clear.message = f"cannot write {filename or unnamed}: {err.strerror}. Fix: {fix}"
    return clear


def run_write_error(err: BaseException, paths: Any) -> DiskWriteError | None:
    """For the entry point: a full-disk or read-only-folder OSError that no atomic write here
    translated (Lightning's checkpoints, loggers, figures, plain mkdirs) as a DiskWriteError
    naming the setting of its folder (`paths`: cfg.paths); None for any other error and for one
    already translated."""
    if isinstance(err, DiskWriteError) or not isinstance(err, OSError):
        return None
    if err.filename is None:
        # Lightning writes a checkpoint to the system temp folder, then moves it into place.
        where = f"a file under {paths.output_dir} or {tempfile.gettempdir()}"
        return disk_write_error(err, setting="paths.output_dir (or TMPDIR)", unnamed=where)
    failed = Path(os.fsdecode(err.filename)).resolve()
    in_data = failed.is_relative_to(Path(paths.data_dir).resolve())
    return disk_write_error(err, setting="paths.data_dir" if in_data else "paths.output_dir")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        _atomic_write_bytes(path, data)
    except OSError as err:
        clear = disk_write_error(err, path)
        if clear is None:
            raise
        raise clear from err


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_builtin) + "\n")


def atomic_save_npz(path: str | os.PathLike, compress: bool = False, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _to_builtin(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
