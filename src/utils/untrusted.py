"""Checks for everything the project reads back from disk.

A file may be truncated, from another version of the code, or crafted; nothing read is used
until it has the expected keys, types and plain values. Nothing read from a file ever goes to
Hydra's `instantiate` (it imports and calls any nested `_target_`): models are rebuilt from
allow-listed classes and keyword names instead (see `src.models.deeplab.build_deeplab`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin

import numpy as np
import torch

from src.utils.errors import UserError

log = logging.getLogger(__name__)


class UntrustedFileError(UserError, ValueError):
    """A file whose content is not what the project writes."""


@dataclass(frozen=True)
class Source:
    """A file being read, the fix to suggest when it is bad, and the error its callers expect."""

    path: Path
    fix: str
    error: type[Exception] = UntrustedFileError

    def fail(self, problem: str, cause: BaseException | None = None) -> NoReturn:
        raise self.error(f"{self.path}: {problem}. Fix: {self.fix}") from cause


# ------------------------------------------------------------------------------ plain values
def conforms(value: Any, kind: Any) -> bool:
    """Whether `value` is of `kind`: str, int, float (ints too), bool, None, `A | B` or
    `list[X]` (a list or tuple). Exact types only: bool is no int, no subclass passes."""
    if kind is None or kind is type(None):
        return value is None
    if isinstance(kind, types.UnionType):
        return any(conforms(value, k) for k in get_args(kind))
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        return type(value) in (list, tuple) and all(conforms(v, item) for v in value)
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def describe(value: Any) -> str:
    if isinstance(value, Mapping) and "_target_" in value:
        return "an object spec with a '_target_' (files may hold plain values only)"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def kind_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind)


def check_fields(
    obj: Any,
    schema: Mapping[str, Any],
    src: Source,
    where: str,
    optional: Collection[str] = (),
) -> dict[str, Any]:
    """`obj` as a dict when it holds only keys of `schema` (all of them but `optional`), each
    value of its kind (see `conforms`); else `src.fail` naming the offending key."""
    if type(obj) is not dict:
        src.fail(f"{where} is {describe(obj)}, expected a dict")
    for key in obj:
        if key not in schema:
            known = ", ".join(schema)
            src.fail(f"{where} has the unknown key {key!r} (known: {known})")
    missing = [k for k in schema if k not in obj and k not in optional]
    if missing:
        src.fail(f"{where} lacks {missing}")
    for key, value in obj.items():
        if not conforms(value, schema[key]):
            src.fail(f"{where}[{key!r}] is {describe(value)}, expected {kind_name(schema[key])}")
    return obj


# Far above any JSON or text file the project writes (a results.json is a few kB).
MAX_TEXT_BYTES = 64 << 20


def read_text(src: Source, limit: int | None = None) -> str:
    """The UTF-8 text of `src.path` when it is a regular file (a link to one is fine) of at most
    `limit` bytes (default MAX_TEXT_BYTES); else `src.fail`. A device (/dev/zero) or a FIFO named
    like the file would otherwise be read without end or block forever, so neither is read."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    not_regular = "is not a regular file (a device, FIFO, socket or folder)"
    try:
        if not stat.S_ISREG(os.stat(src.path).st_mode):
            src.fail(not_regular)
        # O_NONBLOCK: a FIFO swapped in after the stat fails the fstat below instead of
        # blocking the open until a writer comes.
        fd = os.open(src.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                src.fail(not_regular)
            if info.st_size > limit:
                src.fail(f"is {info.st_size} bytes, more than the {limit} this file may hold")
            data = f.read(limit + 1)
    except OSError as err:
        if isinstance(err, src.error):  # src.fail's own error, when it is an OSError
            raise
        src.fail(f"unreadable ({type(err).__name__}: {err})", err)
    if len(data) > limit:  # grew after the fstat
        src.fail(f"holds more than the {limit} bytes this file may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        src.fail(f"is not UTF-8 text ({err})", err)


def parse_json(text: str, src: Source, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        src.fail(f"{where} is not valid JSON ({err})", err)


def read_json_object(path: Path) -> dict | None:
    """A JSON object from a marker or cache file the project can redo: None (with a warning
    when the file exists) when it is missing, unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(read_text(Source(path, "none needed, it is redone")))
    except UntrustedFileError as err:  # not a regular file by now, too big, not UTF-8
        log.warning("ignoring %s", err)
        return None
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than json's
        log.warning("ignoring %s, it is not valid JSON (%s)", path, err)
        return None
    if type(obj) is not dict:
        log.warning("ignoring %s, it holds %s instead of a JSON object", path, type(obj).__name__)
        return None
    return obj


# ------------------------------------------------------------------------------ torch files
def read_torch(src: Source) -> Any:
    """`torch.load` with weights_only (no pickled objects); the result is still unchecked."""
    try:
        return torch.load(src.path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of untrusted bytes: truncated, not torch, pickle
        src.fail(f"not a readable torch checkpoint ({err})", err)


def tensor_state_dict(obj: Any, src: Source, where: str = "the state dict") -> dict:
    """`obj` when it is a flat dict str -> torch.Tensor."""
    if not isinstance(obj, dict):
        src.fail(f"{where} is {describe(obj)}, expected a dict of tensors")
    for key, value in obj.items():
        if type(key) is not str:
            src.fail(f"{where} has the non-string key {describe(key)}")
        if not isinstance(value, torch.Tensor):
            src.fail(f"{where}[{key!r}] is {describe(value)}, expected a tensor")
    return obj


# ------------------------------------------------------------------------------ npz files
def read_npz(
    src: Source, kinds: Mapping[str, str], optional: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """The arrays of an .npz without pickles: exactly the keys of `kinds` (all but `optional`),
    each of a numpy dtype kind in `kinds[key]` (e.g. "f", "iu", "U", "b")."""
    try:
        with np.load(src.path, allow_pickle=False) as z:
            files = list(z.files)
            unknown = [k for k in files if k not in kinds]
            arrays = {k: z[k] for k in files if k in kinds}
    except Exception as err:  # any parse failure of untrusted bytes; object arrays land here too
        src.fail(f"unreadable, or not an npz archive of plain arrays ({err})", err)
    if unknown:
        src.fail(f"unknown arrays {unknown} (known: {list(kinds)})")
    missing = [k for k in kinds if k not in arrays and k not in optional]
    if missing:
        src.fail(f"missing arrays {missing}")
    for key, array in arrays.items():
        if array.dtype.kind not in kinds[key]:
            src.fail(f"array {key!r} has dtype {array.dtype}, expected kind {kinds[key]!r}")
    return arrays
