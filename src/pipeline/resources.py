"""What a stage cost besides its seconds: its peak memory (kept in DONE.json's `resources`).

* Peak RSS of this process during the stage: Linux's high-water mark (VmHWM), reset when the
  stage starts by writing 5 to /proc/self/clear_refs. Where that is refused, the process's
  lifetime peak (getrusage) is recorded instead, and `rss_since` says so.
* Peak RSS of the largest child process reaped so far (CRF pools, loader workers): getrusage's
  RUSAGE_CHILDREN, a lifetime maximum, so it can include an earlier stage's children.
* GPU: torch's max allocated bytes on the current device during the stage, where there is one.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_MB = 2**20


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


@contextmanager
def stage_resources() -> Iterator[dict]:
    """Yields a dict that holds the block's peak memory once the block has finished."""
    since_stage = _reset_peak_rss()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    usage: dict = {}
    yield usage
    usage["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    usage["rss_since"] = "stage start" if since_stage else "process start"
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    usage["children_peak_rss_mb"] = round(children, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        usage["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / _MB, 1)
