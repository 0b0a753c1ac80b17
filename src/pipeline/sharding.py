"""CPU-heavy per-image stages split over the ranks, so no rank waits behind a barrier longer
than one share of the work (on COCO, rank 0 alone would take hours and outlive the collective
timeout of the ranks waiting for it).

A sharded stage runs on every rank: each takes `my_share` of the images, runs its share of the
node's CPU pool (`rank_workers`) inside a settle (`StageContext.settle`, so a failing rank ends
every rank at once), and the partial results are summed afterwards (torchmetrics states over
`metric_group`, plain counts with `sum_over_ranks`). Only ranks that are up share the work:
a stage that runs before any trainer of the invocation has started the others runs on rank 0
alone, which is then the whole world and waits for nobody.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist

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


def rank_workers(node_workers: int) -> int:
    """This rank's share of a process pool sized for the whole node (the configured CRF pools
    are per node, so 8 ranks on one node do not start 8 full pools); at least one."""
    _, world = _world()
    local = _ranks_on_this_node(world) if world > 1 else 1
    return max(1, int(node_workers) // local)


@cache
def _cpu_group(world: int):
    # Under NCCL the default group reduces CUDA tensors only; the sums of a CPU stage go over a
    # gloo group made once (by every rank, at the same point: the first metric of the run).
    return dist.new_group(backend="gloo")


def metric_group():
    """The process group for a CPU stage's torchmetrics states (None: the default group, or no
    distributed run at all). Pass it as `process_group=`."""
    _, world = _world()
    if world == 1 or dist.get_backend() == "gloo":
        return None
    return _cpu_group(world)


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
    node_workers: int,
) -> list[int]:
    """`fn(job_of(i))` for every image i whose output file (folder, suffix) is missing, each
    rank doing its share over its share of the node's process pool. Files an interrupted
    attempt wrote are complete (atomic writes) and kept. Returns every rank's to-do list."""
    out_dir, suffix = out
    with ctx.settle():  # every rank lists the same to-do before any rank writes
        out_dir.mkdir(parents=True, exist_ok=True)
        todo = missing_items(ids, (out_dir, suffix))
    with ctx.settle():
        jobs = [job_of(i) for i in my_share(todo)]
        workers = rank_workers(node_workers)
        log.info("%s: %d of %d images here, %d workers", ctx.name, len(jobs), len(ids), workers)
        run_parallel(fn, jobs, workers)
    return todo
