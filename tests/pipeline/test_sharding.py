"""The sharding helpers in one process (the two-rank behaviour: tests/pipeline/test_ddp.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from src.pipeline.sharding import metric_group, my_share, rank_workers, sum_over_ranks

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


def test_one_process_is_the_whole_world():
    assert my_share(list("abcde")) == list("abcde")
    assert metric_group() is None
    counts = np.array([1, 2, 3], dtype=np.int64)
    np.testing.assert_array_equal(sum_over_ranks(counts), counts)


def test_pool_sizes_are_per_node_and_checked():
    assert rank_workers(3, "segmenter.crf_workers") == 3
    assert rank_workers(None, "segmenter.crf_workers") == len(os.sched_getaffinity(0))
    for bad in (0, -2, "4", 2.0, True):
        with pytest.raises(ValueError, match=r"segmenter.crf_workers=.*per node"):
            rank_workers(bad, "segmenter.crf_workers")
