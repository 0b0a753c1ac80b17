"""The contract between the driver and a stage function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


@dataclass
class StageContext:
    """Everything a stage may touch: its config, its own folder and its inputs' folders."""

    cfg: DictConfig
    round: int
    name: str
    dir: Path
    inputs: dict[str, Path]
    seed: int
    loggers: list[Logger] = field(default_factory=list)
    # Folders of the previous round's stages this one reads (CONTA: its confounders); empty in
    # round 0, the plain baseline.
    previous: dict[str, Path] = field(default_factory=dict)

    def checkpoint_to_resume(self) -> str | None:
        """Lightning's last.ckpt of an interrupted attempt at this same stage config, if any."""
        last = self.dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None


@dataclass
class StageResult:
    """metrics go to DONE.json and the loggers; `results` (if any) into results.json, as
    `{prefix}_{key}` row keys, or as one `prefix` key holding the dict when `nested`."""

    metrics: dict
    artifacts: list[str]
    results: dict | None = None
    prefix: str | None = None
    nested: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageResult]
    config_keys: tuple[str, ...]  # config subtrees whose values change this stage's output
    inputs: tuple[str, ...] = ()  # stages of the same round whose artifacts it reads
    optional_inputs: tuple[str, ...] = ()  # read when they are in `stages` (e.g. pseudo-masks)
    # From round 1 on (CONTA): stages of the previous round it reads, and config keys that only
    # matter then (so round 0 stays shared between CONTA variants).
    previous_inputs: tuple[str, ...] = ()
    round_keys: tuple[str, ...] = ()
    rank_zero_only: bool = False  # numpy-only steps: rank 0 works, the others wait

    def present_inputs(self, stages: list[str]) -> tuple[str, ...]:
        return self.inputs + tuple(i for i in self.optional_inputs if i in stages)
