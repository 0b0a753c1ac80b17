"""Post-processing shared by the pipeline stages: dense CRF, IRNet path index, random walk.

Imported eagerly on purpose: ``random_walk`` is both a submodule and a function, and a lazy
``__getattr__`` would hand out the submodule once something imported it directly.
"""

from .crf import (
    DEEPLAB_CRF,
    IRNET_LABEL_CRF,
    CRFParams,
    crf_labels,
    crf_probs,
    make_ir_label,
    run_parallel,
)
from .path_index import Pairs, PathIndex, affinity_from_boundary, get_path_index
from .random_walk import pseudo_label_from_rw, random_walk, random_walk_dense

__all__ = [
    "DEEPLAB_CRF",
    "IRNET_LABEL_CRF",
    "CRFParams",
    "Pairs",
    "PathIndex",
    "affinity_from_boundary",
    "crf_labels",
    "crf_probs",
    "get_path_index",
    "make_ir_label",
    "pseudo_label_from_rw",
    "random_walk",
    "random_walk_dense",
    "run_parallel",
]
