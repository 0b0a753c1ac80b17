"""Finished stages copied from another run instead of recomputed.

A stage's config hash chains its own settings, its inputs' hashes and the data's fingerprints,
so two runs whose stage hashes agree would compute the same artifacts. The case that matters:
`conta=off` is exactly round 0 of `conta=on` (same hashes, same scores), so a sweep over
`conta=off,on` computes each baseline once (`reuse_from` in conf/train.yaml).

A donor is untrusted like any file: its DONE.json must carry this stage's hash and a results
record of plain values, and the copy is assembled in a hidden sibling folder and renamed into
place, so an interrupted copy never leaves a stage that counts as done.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from src.pipeline.artifacts import DONE_FILE, StageDir
from src.utils.io import atomic_write_json
from src.utils.untrusted import describe

log = logging.getLogger(__name__)
REUSE_PREFIX = ".reuse-"  # hidden copies in progress: round_<t>/.reuse-<stage>-<random>


# A record's prefix and its keys become results.json row keys (`{prefix}_{key}`, or `prefix`):
# plain names only, so a forged `../../x` or `a b` never reaches results.json.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_RESERVED = frozenset({"seconds"})  # row keys the driver writes itself
# What the project's stages record (see eval_cams, eval_pseudo, _score, context_diagnostics):
# numbers (fractions where they are scores), flat dicts of fractions, and the split's name.
_FRACTION_DICTS = frozenset({"errors", "per_class_iou", "sweep"})
_TEXT = frozenset({"split"})


class RecordError(ValueError):
    """A DONE.json results record that is not what the project writes."""


def _is_number(value: object) -> bool:
    return value is None or type(value) is int or (type(value) is float and math.isfinite(value))


def _check_number(value: object, where: str, fraction: bool) -> None:
    if type(value) is bool and not fraction:
        return
    if not _is_number(value) or type(value) is bool:
        raise RecordError(f"{where} is {describe(value)}, expected a finite number or null")
    if fraction and value is not None and not 0 <= value <= 1:
        raise RecordError(f"{where} is {value!r}, expected a fraction in [0, 1]")


def _is_score(key: str) -> bool:
    return key.endswith("miou") or key == "context_leakage"


def check_record_values(prefix: object, values: object, nested: object) -> None:
    """Raise RecordError unless (prefix, values, nested) is a record the project could have
    written: plain-name prefix and keys, finite numbers (scores in [0, 1]), flat dicts of
    fractions under errors / per_class_iou / sweep, a short split name."""
    if type(nested) is not bool:
        raise RecordError(f"'nested' is {describe(nested)}, expected a bool")
    if type(prefix) is not str or not _NAME.match(prefix) or prefix in _RESERVED:
        raise RecordError(f"the prefix {describe(prefix)} is not a plain name")
    if type(values) is not dict:
        raise RecordError(f"'values' is {describe(values)}, expected an object")
    for key, value in values.items():
        where = f"values[{key[:64]!r}]"
        if not _NAME.match(key):
            raise RecordError(f"the key {key[:64]!r} is not a plain name")
        if not nested and key in _TEXT:
            if type(value) is not str or not _NAME.match(value):
                raise RecordError(f"{where} is {describe(value)}, expected a split name")
        elif not nested and key in _FRACTION_DICTS:
            if type(value) is not dict:
                raise RecordError(f"{where} is {describe(value)}, expected an object")
            for name, item in value.items():
                if not name.isprintable() or len(name) > 200:
                    raise RecordError(f"{where} has the key {name[:64]!r}")
                _check_number(item, f"{where}[{name[:64]!r}]", fraction=True)
        else:
            _check_number(value, where, fraction=_is_score(key))


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage contributes to its run's results.json (see driver.record)."""

    prefix: str
    values: dict
    nested: bool

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "values": self.values, "nested": self.nested}

    @classmethod
    def parse(cls, done: dict) -> StageRecord:
        """The record in a DONE.json, checked (check_record_values); RecordError saying why
        it is no record the project writes."""
        record = done.get("results")
        if type(record) is not dict:
            raise RecordError("it has no results record (written before records existed?)")
        unknown = set(record) - {"prefix", "values", "nested"}
        if unknown:
            raise RecordError(f"its results record has the unknown keys {sorted(unknown)}")
        prefix, values, nested = record.get("prefix"), record.get("values"), record.get("nested")
        check_record_values(prefix, values, nested)
        return cls(prefix, values, nested)

    @classmethod
    def from_done(cls, done: dict) -> StageRecord | None:
        """The record in a DONE.json, or None when it has none or it is not plain values (a
        marker written before records existed, or a damaged one: the stage is then computed)."""
        try:
            return cls.parse(done)
        except RecordError:
            return None


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no bytes duplicated; artifacts are never rewritten in place, a redo removes
    the folder first), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _donor_done(donor: StageDir, digest: str) -> dict | None:
    done = donor.read_done()
    if done is None or done.get("config_hash") != digest:
        return None
    return done


def reuse_stage(target: StageDir, digest: str, donors: Iterable[Path]) -> Path | None:
    """Copy the first donor run's finished stage with hash `digest` into `target`; returns the
    donor's stage folder, or None when no donor has it (the caller then computes the stage).

    Call on one process (rank 0). `target`'s current contents (an unfinished attempt) are
    replaced only once the copy is complete and still matches its donor."""
    own = target.run_dir.resolve()
    for run_dir in donors:
        run_dir = Path(run_dir)
        if not run_dir.is_dir() or run_dir.resolve() == own:
            continue
        donor = StageDir(run_dir, target.round, target.stage)
        done = _donor_done(donor, digest)
        if done is None:
            continue
        try:
            StageRecord.parse(done)
        except RecordError as err:  # forged or damaged: never let it near results.json
            log.warning("not reusing %s: %s; computing the stage instead", donor.done_file, err)
            continue
        if _copy_stage(donor, target, digest):
            return donor.path
    return None


def _remove(path: Path) -> None:
    """A leftover copy: its folder, or (never made by us) a link or file of that name."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_killed_copies(run_dir: Path) -> int:
    """Delete the hidden copies a killed reuse left in the run's round folders (they never
    count as done, but a kill mid-copy left them, often the size of the stage, for good);
    returns how many. Call on rank 0 when the run starts, before any stage is looked at."""
    stale = sorted(Path(run_dir).glob(f"round_*/{REUSE_PREFIX}*"))
    for path in stale:
        _remove(path)
    if stale:
        log.warning(
            "removed %d unfinished reuse cop%s of a killed run: %s",
            len(stale),
            "y" if len(stale) == 1 else "ies",
            ", ".join(str(p) for p in stale[:5]),
        )
    return len(stale)


def _copy_stage(donor: StageDir, target: StageDir, digest: str) -> bool:
    round_dir = target.path.parent
    round_dir.mkdir(parents=True, exist_ok=True)
    for stale in round_dir.glob(f"{REUSE_PREFIX}{target.stage}-*"):  # a killed earlier copy
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f"{REUSE_PREFIX}{target.stage}-", dir=round_dir))
    try:
        # DONE.json last: the copy holds every artifact before it holds the marker.
        shutil.copytree(
            donor.path,
            tmp / "stage",
            copy_function=_link_or_copy,
            ignore=lambda folder, names: [DONE_FILE] if Path(folder) == donor.path else [],
        )
        done = _donor_done(donor, digest)  # the donor may have been redone meanwhile
        if done is None or StageRecord.from_done(done) is None:  # ... or its marker rewritten
            log.warning("not reusing %s: it changed while being copied", donor.path)
            return False
        done["reused_from"] = str(donor.path)
        atomic_write_json(tmp / "stage" / DONE_FILE, done)
        if target.path.exists():
            shutil.rmtree(target.path)
        os.replace(tmp / "stage", target.path)
        return True
    except OSError as err:  # e.g. the donor was reset under us: compute the stage instead
        log.warning("not reusing %s (%s); computing the stage", donor.path, err)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
