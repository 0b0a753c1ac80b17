"""Stage directories, DONE markers and atomic writes.

A stage writes only under `run_dir/round_{t}/{stage}/` and ends with `DONE.json`. Every file is
written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written artifact that a later run would take as finished.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DONE_FILE = "DONE.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_builtin) + "\n")


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _to_builtin(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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

    def mark_done(self, config_hash: str, *, metrics: dict, seconds: float, artifacts: list[str]):
        atomic_write_json(
            self.done_file,
            {
                "stage": self.stage,
                "round": self.round,
                "config_hash": config_hash,
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
