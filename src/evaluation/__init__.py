"""Evaluation: the one segmentation metric, CAM threshold sweeps, results files and figures.

``metrics`` and ``cam`` are imported eagerly; the names of ``report`` and ``figures`` resolve on
first use, so importing the metric does not pull in rich or build the figure helpers.
"""

from importlib import import_module
from typing import Any

from src.evaluation.cam import DEFAULT_THRESHOLDS, ThresholdSweep, cam_to_label
from src.evaluation.metrics import ERROR_KEYS, SegmentationMetric, metrics_from_counts

_LAZY = {
    "load_results": "report",
    "update_results": "report",
    "render_markdown": "report",
    "write_markdown": "report",
    "print_results": "report",
    "stage_row": "report",
    "overlay_grid": "figures",
    "curve_plot": "figures",
    "voc_palette": "figures",
    "colorize": "figures",
}

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ERROR_KEYS",
    "SegmentationMetric",
    "ThresholdSweep",
    "cam_to_label",
    "metrics_from_counts",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"src.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
