"""Finished stages copied from another run instead of recomputed.

A stage's config hash chains its own settings, its inputs' hashes and the data's fingerprints,
so two runs whose stage hashes agree would compute the same artifacts. The case that matters:
`conta=off` is exactly round 0 of `conta=on` (same hashes, same scores), so a sweep over
`conta=off,on` computes each baseline once (`reuse_from` in conf/train.yaml).

A donor is untrusted like any file: its DONE.json must carry this stage's hash and a results
record of the plain values the stages write (check_record_values), its folder may hold only
folders and regular files (no link out of it is followed), and the copy is assembled in a
hidden sibling folder and renamed into place, so an interrupted copy never leaves a stage that
counts as done (and a killed one is removed when the next run starts: remove_killed_copies).
Stages that only score their inputs (Stage.reuse=False: eval_cams, eval_pseudo, eval_segmenter)
are never copied: the driver computes them from the copied artifacts, so a donor's scores are not
taken on faith. Nor are the scores other stages record: a stage that records any (the CRF's
`seg_crf`, train_cam's CONTA diagnostics) has a `Stage.rescore` that recomputes its record from
its copied artifacts; its copy lands with the donor's marker held back as REUSED.json (it does
not count as done) until the driver has recomputed the record and written DONE.json
(finish_rescore). A donor whose record holds values for a stage without a rescore is not used.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from src.pipeline.artifacts import DONE_FILE, RUNNING_FILE, StageDir
from src.utils.io import atomic_write_json
from src.utils.untrusted import describe, read_json_object

log = logging.getLogger(__name__)
REUSE_PREFIX = ".reuse-"  # hidden copies in progress: round_<t>/.reuse-<stage>-<random>
# A complete copy whose record is still to be recomputed (Stage.rescore): the donor's DONE.json,
# held back under this name; the stage counts as done only once finish_rescore wrote DONE.json.
REUSED_FILE = "REUSED.json"
_FREE_MARGIN = 256 << 20  # a copy across file systems leaves at least this much free


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
    the folder first), or a copy across file systems. Links are never followed: `src` is a
    regular file by the time it gets here (see _donor_listing)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


class UnsafeDonorError(ValueError):
    """A donor stage folder holding what a stage never writes: a link out of it, a device."""


@dataclass(frozen=True)
class _Listing:
    folders: list[Path]  # relative to the stage folder, parents first
    files: list[Path]
    bytes: int  # the files' apparent sizes: what a copy across file systems writes


def _donor_listing(root: Path) -> _Listing:
    """The folders and regular files under a donor's stage folder `root`, never following a
    link. A link that stays inside `root` (W&B's `latest-run`) is left out of the copy; a link
    out of it, or a FIFO, device or socket, makes the donor an UnsafeDonorError."""
    if root.is_symlink() or not root.is_dir():
        raise UnsafeDonorError(f"{root} is a link or no folder")
    folders: list[Path] = []
    files: list[Path] = []
    total = 0
    pending = [Path()]
    while pending:
        rel = pending.pop()
        with os.scandir(root / rel) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = rel / entry.name
                if entry.is_symlink():
                    target = (root / rel / os.readlink(entry.path)).resolve()
                    if not target.is_relative_to(root.resolve()):
                        raise UnsafeDonorError(f"{root / path} is a link out of the stage folder")
                    log.debug("not copying the link %s (inside the donor)", root / path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    files.append(path)
                    total += entry.stat(follow_symlinks=False).st_size
                else:
                    raise UnsafeDonorError(f"{root / path} is not a regular file")
    return _Listing(sorted(folders, key=lambda p: len(p.parts)), files, total)


def _only_regular_files(root: Path) -> bool:
    """Whether the finished copy holds folders and regular files only (a donor file swapped
    for a link while it was copied would otherwise be carried over)."""
    for folder, subfolders, names in os.walk(root):
        for name in subfolders + names:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return False
    return True


# Markers, not artifacts: DONE.json is written last (or held back, REUSED_FILE); a RUNNING.json
# a donor kept (killed between its DONE.json and the marker's removal) would make an unfinished
# copy look like an interrupted attempt to resume in place, writing through the hard links.
_MARKERS = frozenset({Path(DONE_FILE), Path(REUSED_FILE), Path(RUNNING_FILE)})


def _copy_files(donor: Path, dst: Path, listing: _Listing) -> None:
    dst.mkdir()
    for folder in listing.folders:
        (dst / folder).mkdir()
    for rel in listing.files:
        if rel not in _MARKERS:
            _link_or_copy(str(donor / rel), str(dst / rel))


def _same_file_system(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _room_for(listing: _Listing, donor: Path, dst_dir: Path) -> str | None:
    """Why the copy cannot go ahead (None when it can): across file systems every byte is
    written out, holes of a sparse file included, so the files must fit the free space."""
    if _same_file_system(donor, dst_dir):
        return None  # hard links: no bytes written
    free = shutil.disk_usage(dst_dir).free
    if listing.bytes > free - _FREE_MARGIN:
        return (
            f"its files hold {listing.bytes} bytes (holes of sparse files included), more than "
            f"the {free} free on {dst_dir}'s file system"
        )
    return None


def _donor_done(donor: StageDir, digest: str) -> dict | None:
    done = donor.read_done()
    if done is None or done.get("config_hash") != digest:
        return None
    return done


def reuse_stage(
    target: StageDir, digest: str, donors: Iterable[Path], rescore: bool = False
) -> Path | None:
    """Copy the first donor run's finished stage with hash `digest` into `target`; returns the
    donor's stage folder, or None when no donor has it (the caller then computes the stage).

    `rescore`: the stage recomputes its record from its artifacts (Stage.rescore): the copy
    holds the donor's marker as REUSED.json, not DONE.json (see pending_rescore). Without it, a
    donor whose record holds any value is passed over: its numbers could not be checked.

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
            record = StageRecord.parse(done)
        except RecordError as err:  # forged or damaged: never let it near results.json
            log.warning("not reusing %s: %s; computing the stage instead", donor.done_file, err)
            continue
        if record.values and not rescore:
            log.warning(
                "not reusing %s: its record holds values %s that this stage cannot recompute "
                "from the copy; computing the stage instead",
                donor.done_file,
                sorted(record.values)[:5],
            )
            continue
        if _copy_stage(donor, target, digest, REUSED_FILE if rescore else DONE_FILE):
            return donor.path
    return None


def pending_rescore(target: StageDir, digest: str) -> dict | None:
    """The donor's marker of a complete copy of `target` whose record is still to be recomputed
    (reuse_stage with rescore), when it is for `digest` and no DONE.json is there; else None."""
    if target.done_file.exists():
        return None
    held = read_json_object(target.path / REUSED_FILE)
    if held is None or held.get("config_hash") != digest:
        return None
    return held


def finish_rescore(target: StageDir, held: dict, row: StageRecord, metrics: dict) -> None:
    """Mark a rescored copy done: the donor's marker with the recomputed record (and metrics)
    in place of the donor's. The caller has written the row into results.json already."""
    done = {**held, "metrics": {**(held.get("metrics") or {}), **metrics}}
    done["results"] = row.to_json()
    atomic_write_json(target.done_file, done)
    (target.path / REUSED_FILE).unlink(missing_ok=True)


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


def _copy_stage(donor: StageDir, target: StageDir, digest: str, marker: str) -> bool:
    """Copy `donor` into `target` through a hidden sibling folder; the donor's DONE.json lands
    last, as `marker` (DONE.json, or REUSED_FILE for a record still to be recomputed)."""
    round_dir = target.path.parent
    round_dir.mkdir(parents=True, exist_ok=True)
    for stale in round_dir.glob(f"{REUSE_PREFIX}{target.stage}-*"):  # a killed earlier copy
        _remove(stale)
    try:
        listing = _donor_listing(donor.path)
    except (UnsafeDonorError, OSError) as err:
        log.warning("not reusing %s: %s; computing the stage instead", donor.path, err)
        return False
    no_room = _room_for(listing, donor.path, round_dir)
    if no_room is not None:
        log.warning("not reusing %s: %s; computing the stage instead", donor.path, no_room)
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f"{REUSE_PREFIX}{target.stage}-", dir=round_dir))
    try:
        # DONE.json last: the copy holds every artifact before it holds the marker.
        _copy_files(donor.path, tmp / "stage", listing)
        done = _donor_done(donor, digest)  # the donor may have been redone meanwhile
        if done is None or StageRecord.from_done(done) is None:  # ... or its marker rewritten
            log.warning("not reusing %s: it changed while being copied", donor.path)
            return False
        if not _only_regular_files(tmp / "stage"):
            log.warning("not reusing %s: a file became a link while being copied", donor.path)
            return False
        done["reused_from"] = str(donor.path)
        atomic_write_json(tmp / "stage" / marker, done)
        if target.path.exists():
            shutil.rmtree(target.path)
        os.replace(tmp / "stage", target.path)
        return True
    except OSError as err:  # e.g. the donor was reset under us: compute the stage instead
        log.warning("not reusing %s (%s); computing the stage", donor.path, err)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
