"""Rank coordination for the stages and the driver: which rank this is, barriers, and sections
every rank leaves together, a failure on one shown once and ending them all."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import torch.distributed as dist

log = logging.getLogger(__name__)


def global_rank() -> int:
    """This process's rank; before the process group exists, from the launcher's variables:
    RANK (torchrun), SLURM_PROCID (srun, one task per rank), or Lightning's own launcher's
    LOCAL_RANK and NODE_RANK (its children have LOCAL_RANK; the process started on node n > 0
    has NODE_RANK = n and no LOCAL_RANK). Without the node's process count the last case is
    exact only as to being zero or not, which is what `is_global_zero` needs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    local = int(env.get("LOCAL_RANK", 0))
    if "LOCAL_RANK" not in env and int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return node * int(env.get("LOCAL_WORLD_SIZE", 1)) + local if node else local


def is_global_zero() -> bool:
    return global_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# Failures under DDP. Rank-0-only work used to end at a bare barrier: when rank 0 raised, the
# other ranks sat in that barrier until the collective timeout (30 min; under gloo they instead
# died of "connection closed" with a second, misleading traceback). A settle replaces such a
# barrier: every rank learns whether any rank failed, the failed one logs its error once, the
# others raise RankFailed, which `src.train.train` prints as one line; all exit with status 1.

T = TypeVar("T")
LAUNCHER_PID = "WSSS_LAUNCHER_PID"  # rank 0's pid, for the ranks Lightning starts as its children


class RankFailed(RuntimeError):
    """Another rank failed in a section every rank shares; that rank shows the error itself."""


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def ranks_settle(what: str) -> Iterator[None]:
    """A barrier that cannot hang on a failed rank, after a block that holds no collective:
    every rank runs the block, then all of them learn which ranks failed in it, and with what.

    A rank whose block raised re-raises its error, marked as shown (see `error_shown`), after
    logging it with its traceback, unless a lower rank failed with the same message (a bad
    setting fails every rank alike): then it logs one line naming that rank. The others raise
    RankFailed. No-op in a single process. The block must not itself wait on other ranks: a
    rank failing inside a collective is Lightning's to handle."""
    if not _several_ranks():
        yield
        return
    try:
        yield
    except Exception as error:
        rank, message = dist.get_rank(), f"{type(error).__name__}: {error}"
        same = [r for r, m in enumerate(_rank_errors(message)) if m == message and r < rank]
        if same:
            log.error("rank %d failed in %s with the same error as rank %d", rank, what, same[0])
        else:
            log.error("rank %d failed in %s", rank, what, exc_info=error)
        with suppress(AttributeError):  # an exception type that takes no attributes
            error._shown_by_rank = True  # type: ignore[attr-defined]
        raise
    failed = [rank for rank, message in enumerate(_rank_errors(None)) if message is not None]
    if failed:
        raise RankFailed(f"rank {failed[0]} failed in {what}; see its error")


def run_on_rank_zero(fn: Callable[[], T], what: str) -> T | None:
    """fn() on rank 0 while the other ranks wait (None there); they all leave together, each
    with rank 0's failure if fn raised (the error itself on rank 0, RankFailed elsewhere)."""
    result = None
    with ranks_settle(what):
        if is_global_zero():
            result = fn()
    return result


def _rank_errors(message: str | None) -> list[str | None]:
    """Every rank's error message (None: no error), by rank."""
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)  # the barrier itself; objects work under NCCL too
    return messages


def error_shown(error: BaseException) -> bool:
    """True for an error its rank already logged in full (in a `ranks_settle` block)."""
    return getattr(error, "_shown_by_rank", False) is True


def end_distributed() -> None:
    """Destroy the process group (local, no collective) so that exiting waits on no peer."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_with_rank_zero(poll_s: float = 1.0) -> Callable[[], None]:
    """Lightning's launcher starts ranks 1.. as children of rank 0's process. Rank 0 notes its
    pid here for them; such a child then exits (status 1, one line) once rank 0's process is
    gone, wherever either was: a backstop for failures outside a settle (e.g. rank 0 failing in
    a trainer under NCCL, whose collectives wait out their timeout on a dead peer). Ranks another
    launcher started (torchrun, SLURM) are left to it. Returns the function that stops the watch
    (call it when done). The converse, a child failing, Lightning's launcher handles: it kills
    rank 0 when a child exits non-zero."""
    if is_global_zero():
        os.environ[LAUNCHER_PID] = str(os.getpid())
        return lambda: None
    parent = os.getppid()
    if os.environ.get(LAUNCHER_PID) != str(parent):
        return lambda: None
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent:
                rank = global_rank()
                log.error("rank %d: rank 0 (pid %d) has ended; stopping too", rank, parent)
                for stream in (sys.stdout, sys.stderr):
                    with suppress(Exception):
                        stream.flush()
                os._exit(1)

    threading.Thread(target=watch, name="rank-zero-watch", daemon=True).start()
    return done.set
