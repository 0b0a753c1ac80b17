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
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from src.pipeline.artifacts import DONE_FILE, StageDir
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)
REUSE_PREFIX = ".reuse-"  # hidden copies in progress: round_<t>/.reuse-<stage>-<random>


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage contributes to its run's results.json (see driver.record)."""

    prefix: str
    values: dict
    nested: bool

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "values": self.values, "nested": self.nested}

    @classmethod
    def from_done(cls, done: dict) -> StageRecord | None:
        """The record in a DONE.json, or None when it has none or it is not plain values (a
        marker written before records existed, or a damaged one: the stage is then computed)."""
        record = done.get("results")
        if type(record) is not dict:
            return None
        prefix, values, nested = record.get("prefix"), record.get("values"), record.get("nested")
        if type(prefix) is not str or type(values) is not dict or type(nested) is not bool:
            return None
        return cls(prefix, values, nested)


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
        if StageRecord.from_done(done) is None:
            log.info("not reusing %s: its DONE.json has no results record", donor.path)
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
        if done is None:
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
