"""Stage directories, DONE markers and atomic writes.

A stage writes only under `run_dir/round_{t}/{stage}/` and ends with `DONE.json`. Every file is
written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written artifact that a later run would take as finished.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from src.utils.io import atomic_write_json
from src.utils.untrusted import read_json_object

DONE_FILE = "DONE.json"
RUNNING_FILE = "RUNNING.json"  # the driver's in-progress marker of an attempt at a stage


def is_temp_file(path: Path) -> bool:
    """A temporary file of `src.utils.io`'s atomic writes (`.{name}.{random}.tmp`, renamed into
    place when complete): one still there was cut short by a kill and holds nothing usable."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


@dataclass(frozen=True)
class StageDir:
    """The folder of one stage of one round, and its completion marker."""

    run_dir: Path
    round: int
    stage: str

    @property
    def path(self) -> Path:
        return self.run_dir / f"round_{self.round}" / self.stage

    @property
    def done_file(self) -> Path:
        return self.path / DONE_FILE

    def read_done(self) -> dict | None:
        return read_json_object(self.done_file)  # a damaged marker: the stage is redone

    def is_done(self, config_hash: str) -> bool:
        done = self.read_done()
        return done is not None and done.get("config_hash") == config_hash

    def mark_done(
        self,
        config_hash: str,
        *,
        metrics: dict,
        seconds: float,
        artifacts: list[str],
        config: dict | None = None,
        results: dict | None = None,
        resources: dict | None = None,
    ):
        """`results`: the stage's results.json record (prefix, values, nested), kept so that
        another run can reuse this stage (src/pipeline/reuse.py); `resources`: its peak memory
        (src/pipeline/resources.py)."""
        atomic_write_json(
            self.done_file,
            {
                "stage": self.stage,
                "round": self.round,
                "config_hash": config_hash,
                "config": config or {},
                "metrics": metrics,
                "seconds": round(seconds, 2),
                "artifacts": sorted(artifacts),
                "results": results or {},
                "resources": resources or {},
            },
        )

    def remove_temp_files(self) -> int:
        """Delete the temporary files an interrupted attempt left in this stage's folder (and its
        subfolders, nothing outside); returns how many. Lightning's checkpoints are not among
        them: its local `_atomic_save` writes to the system temp folder, not here."""
        if not self.path.is_dir():
            return 0
        stale = [p for p in self.path.rglob(".*.tmp") if is_temp_file(p)]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def reset(self) -> None:
        """Start the stage over: remove what an earlier, different or unfinished attempt left."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)


# -- per-image stages: what an interrupted attempt already wrote --------------------------------
Output = tuple[Path, str]  # (folder, suffix): item `id` is at folder / f"{id}{suffix}"


def missing_items(ids: Sequence[str], *outputs: Output) -> list[int]:
    """Indices of the items whose outputs are not all on disk: what this attempt must compute.

    An item whose files exist under their final names is complete and is reused as it is: every
    per-image file is written to a temporary name in the same folder and renamed into place
    (`src.utils.io`), so the final name never holds a partial file. Existence is the validity
    check; what a kill cuts short is a `.*.tmp`, removed when the stage restarts."""
    return [
        i
        for i, image_id in enumerate(ids)
        if not all((folder / f"{image_id}{suffix}").is_file() for folder, suffix in outputs)
    ]


def resume_counts(ids: Sequence[str], todo: Sequence[int], *outputs: Output) -> dict[str, int]:
    """For DONE.json after a per-image stage ran: `computed`, the items of `todo` now on disk
    (written by this attempt), and `reused`, the items that were already there and skipped.
    Counted from the disk, not from `todo`, so `computed + reused == len(ids)` is a check that
    every item was produced (call it once every rank has finished writing)."""
    todo_set = set(todo)
    on_disk = set(range(len(ids))) - set(missing_items(ids, *outputs))
    return {"computed": len(on_disk & todo_set), "reused": len(on_disk - todo_set)}
