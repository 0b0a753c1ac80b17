"""A training batch that means the same on 1 or 8 devices.

A recipe's batch is the paper's: the images of one optimizer step (`batch_size`, times
`accumulate_grad_batches` where a recipe accumulates, e.g. DeepLab's 5 x 2). Under DDP each rank
takes global / world of them per step, as micro-batches no larger than the recipe's
`batch_size` (the memory the recipe was sized for), so the step count, the schedule and the
images seen are those of a single process. A batch that does not divide over the ranks is an
error naming the key, never a silent change of recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import lightning as L
from omegaconf import DictConfig, OmegaConf

from src.pipeline.plan import PipelineError
from src.pipeline.stage import Stage


@dataclass(frozen=True)
class RankBatch:
    """One rank's share of a global batch: `per_rank` images per forward, `accumulate` forwards
    per optimizer step, over `world` ranks."""

    global_size: int
    world: int
    per_rank: int
    accumulate: int


def rank_batch(batch_size: int, accumulate: int, world: int, key: str) -> RankBatch:
    """The share of `batch_size` x `accumulate` images per step (the recipe's global batch) that
    each of `world` ranks takes; `key` names the recipe's batch setting in errors."""
    if batch_size < 1 or accumulate < 1 or world < 1:
        raise ValueError(
            f"{key}={batch_size} with accumulate_grad_batches={accumulate} over {world} ranks: "
            "every one must be >= 1"
        )
    global_size = batch_size * accumulate
    if global_size % world:
        multiple = world * math.ceil(global_size / world)
        raise ValueError(
            f"the global batch of {key} ({global_size} images per optimizer step) does not divide "
            f"over {world} ranks (devices x nodes). Fix: set {key} so that the global batch is a "
            f"multiple of {world} (e.g. {multiple}, scaling the lr if you change it), or run on a "
            f"number of devices that divides {global_size}."
        )
    share = global_size // world
    steps = math.ceil(share / batch_size)  # fewest forwards that keep each within batch_size
    while share % steps:
        steps += 1
    return RankBatch(global_size, world, share // steps, steps)


def check_global_batches(cfg: DictConfig, stages: Iterable[Stage], world: int) -> None:
    """Every training stage's global batch divides over `world` ranks, or a PipelineError naming
    each that does not. The driver asks before the first stage, so DeepLab's 10 on 8 GPUs stops
    the run in seconds, not after the classifier, the CAMs and the affinity net of round 0."""
    problems = []
    for stage in stages:
        if not stage.global_batch:
            continue
        batch_key, *accumulate_key = stage.global_batch
        accumulate = OmegaConf.select(cfg, accumulate_key[0]) if accumulate_key else 1
        try:
            rank_batch(int(OmegaConf.select(cfg, batch_key)), int(accumulate), world, batch_key)
        except ValueError as err:
            problems.append(f"{stage.name}: {err}")
    if problems:
        raise PipelineError("no stage has run:\n" + "\n".join(problems))


def split_over_ranks(trainer: L.Trainer, batch_size: int, key: str, accumulate: int = 1):
    """`rank_batch` for this trainer's world, with its gradient accumulation set to match."""
    share = rank_batch(int(batch_size), int(accumulate), trainer.world_size, key)
    trainer.accumulate_grad_batches = share.accumulate
    return share


def batch_metrics(trainer: L.Trainer, share: RankBatch) -> dict[str, int]:
    """What DONE.json records of a training stage's batches: equal on 1 or N devices."""
    return {
        "global_batch_size": share.per_rank * share.accumulate * trainer.world_size,
        "optimizer_steps": int(trainer.global_step),
    }
