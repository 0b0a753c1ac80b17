"""CPU-heavy per-image stages split over the ranks, so no rank waits behind a barrier longer
than one share of the work (on COCO, rank 0 alone would take hours and outlive the collective
timeout of the ranks waiting for it).

A sharded stage runs on every rank: each takes `my_share` of the images, runs its share of the
node's CPU pool (`rank_workers`) inside a settle (`StageContext.settle`, so a failing rank ends
every rank at once), and the partial results are summed afterwards (torchmetrics states over
`metric_group`, plain counts with `sum_over_ranks`). Before each stage the driver starts the
configured ranks if no trainer has yet (`trainers.start_ranks`: a resume that begins at
crf_segmenter is shared too) and calls `prepare_shards`, so no collective is first made inside
a settle.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from src.pipeline.artifacts import missing_items
from src.postprocess.crf import run_parallel

if TYPE_CHECKING:
    from src.pipeline.stage import StageContext

log = logging.getLogger(__name__)
T = TypeVar("T")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: every world-size-th from its rank on, as Lightning's unrepeated
    prediction sampler deals them (neighbours in a data set cost alike, so shares balance)."""
    rank, world = _world()
    return list(items[rank::world])


@cache
def _ranks_on_this_node(world: int) -> int:
    hosts: list = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    return max(1, hosts.count(socket.gethostname()))


def rank_workers(node_workers: int | None, key: str) -> int:
    """This rank's share of a process pool sized for the whole node (the configured CRF pools
    are per node, so 8 ranks on one node do not start 8 full pools); at least one. None: every
    core this process may run on. `key` names the setting in errors."""
    if node_workers is None:
        node_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if type(node_workers) is not int or node_workers < 1:
        raise ValueError(
            f"{key}={node_workers!r}: expected a number of CRF processes per node (>= 1), or "
            "null for every core of the node"
        )
    _, world = _world()
    local = _ranks_on_this_node(world) if world > 1 else 1
    return max(1, node_workers // local)


@cache
def _cpu_group(world: int):
    # Under NCCL the default group reduces CUDA tensors only; the sums of a CPU stage go over a
    # gloo group, made once by every rank in step (prepare_shards).
    return dist.new_group(backend="gloo")


def prepare_shards() -> None:
    """Make the collectives the helpers below would need inside a settle (the node's rank
    count, the gloo group under NCCL) while every rank is in step: call it on every rank
    before a stage, outside any settle, where a failed rank cannot leave the others waiting."""
    _, world = _world()
    if world > 1:
        _ranks_on_this_node(world)
        metric_group()


def metric_group():
    """The process group for a CPU stage's torchmetrics states (None: the default group, or no
    distributed run at all). Pass it as `process_group=`."""
    _, world = _world()
    if world == 1 or dist.get_backend() == "gloo":
        return None
    return _cpu_group(world)


def gather_over_ranks(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] in one process.
    Call it outside a settle, once every rank's share is done."""
    _, world = _world()
    if world == 1:
        return [value]
    values: list = [None] * world
    dist.all_gather_object(values, value, group=metric_group())
    return values


def sum_over_ranks(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of every rank's int64 counts (the same shape on all ranks)."""
    _, world = _world()
    if world == 1:
        return values
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=metric_group())
    return tensor.numpy()


def run_image_jobs(
    ctx: StageContext,
    ids: Sequence[str],
    out: tuple[Path, str],
    job_of: Callable[[int], tuple],
    fn: Callable[[tuple], None],
    workers_key: str | None,
) -> list[int]:
    """`fn(job_of(i))` for every image i whose output file (folder, suffix) is missing, each
    rank doing its share over its share of the node's process pool (the config key
    `workers_key`; None: in this process). Files an interrupted attempt wrote are complete
    (atomic writes) and kept.
    Returns every rank's to-do list."""
    out_dir, suffix = out
    with ctx.settle():  # every rank lists the same to-do before any rank writes
        out_dir.mkdir(parents=True, exist_ok=True)
        todo = missing_items(ids, (out_dir, suffix))
    with ctx.settle():
        jobs = [job_of(i) for i in my_share(todo)]
        # None: a cheap job, run in this process (no pool to start).
        workers = (
            1
            if workers_key is None
            else rank_workers(OmegaConf.select(ctx.cfg, workers_key), workers_key)
        )
        log.info("%s: %d of %d images here, %d workers", ctx.name, len(jobs), len(ids), workers)
        run_parallel(fn, jobs, workers)
    return todo
