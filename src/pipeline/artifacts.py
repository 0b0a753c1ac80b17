"""Stage directories, DONE markers and atomic writes.

A stage writes only under `run_dir/round_{t}/{stage}/` and ends with `DONE.json`. Every file is
written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written artifact that a later run would take as finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from src.utils.io import atomic_write_json

DONE_FILE = "DONE.json"


class MissingArtifactError(FileNotFoundError):
    """A stage's input artifact is missing or does not fit (another data set, split, size)."""


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
        if not self.done_file.is_file():
            return None
        return json.loads(self.done_file.read_text())

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
    ):
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
            },
        )

    def reset(self) -> None:
        """Start the stage over: remove what an earlier, different or unfinished attempt left."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
