"""The one dense-CRF wrapper (pydensecrf) used by every stage, plus a process pool for it.

The parameter sets in use:

* :data:`IRNET_LABEL_CRF` — IRNet ``imutils.crf_inference_label``: unary from a hard label
  map (``unary_from_labels``, gt_prob 0.7, zero_unsure False), used for IR labels.
* :data:`DEEPLAB_CRF` — deeplab-pytorch ``DenseCRF``: unary from softmax probabilities,
  used to refine segmenter outputs.
* :data:`SEC_TRAIN_CRF` / :data:`SEC_TEST_CRF` — SEC's ``krahenbuhl2013.CRF`` at
  ``scale_factor`` 12 (the constrain-to-boundary target on the 41x41 grid, also DSRG's) and 1
  (full-resolution test-time refinement); the unary is a given energy
  (:func:`crf_from_unary`).

pydensecrf is CPU-only and single-threaded, so throughput comes from :func:`run_parallel`.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

T = TypeVar("T")
R = TypeVar("R")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _real(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _crf_field_problem(name: str, value: Any) -> str | None:
    """What is wrong with one CRFParams field's value, or None.

    pydensecrf takes any number without complaint: a zero or negative bandwidth divides the
    features by it (inf / NaN kernels), a negative compat turns the Potts penalty into a reward,
    and a float or zero iteration count fails or silently does nothing."""
    if name == "iterations":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            return "must be an int >= 1 (mean-field iterations)"
    elif name.endswith(("_sxy", "_srgb")):
        if not _real(value) or not math.isfinite(value) or value <= 0:
            return "must be a finite number > 0 (a kernel bandwidth)"
    elif name.endswith("_compat"):
        if not _real(value) or not math.isfinite(value) or value < 0:
            return "must be a finite number >= 0 (a Potts weight)"
    elif name == "gt_prob" and (not _real(value) or not 0 < value < 1):
        return "must be in (0, 1)"
    return None


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and pairwise kernels; ``gt_prob`` only matters for label unaries.

    Every value is checked on construction (ValueError naming the field and the value); build
    from a config block with :meth:`from_config`, whose errors also name the block."""

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    gt_prob: float = 0.7

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _crf_field_problem(f.name, value)
            if problem:
                raise ValueError(f"{f.name}={_show(value)}: {problem}")

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None, where: str) -> CRFParams:
        """CRFParams from a config block (a dict or DictConfig) found at ``where`` (e.g.
        "seeded.test_crf"); unknown, missing and bad keys raise ValueError("{where}.{key}...")."""
        names = [f.name for f in fields(cls)]
        if not isinstance(block, Mapping):
            raise ValueError(
                f"{where} must be a mapping of CRF parameters {names}, got {_show(block)}"
            )
        given = [str(k) for k in block]
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ValueError(
                f"{where}.{unknown[0]}: unknown CRF parameter(s) {unknown}; "
                f"{where} takes {names}. Fix: remove or rename it in the config."
            )
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in given]
        if missing:
            raise ValueError(
                f"{where}.{missing[0]} is not set (missing: {missing}). Fix: set it in {where}."
            )
        values = {k: block[k] for k in given}
        for name, value in values.items():
            problem = _crf_field_problem(name, value)
            if problem:
                raise ValueError(
                    f"{where}.{name}={_show(value)}: {problem}. Fix: set it in {where}."
                )
        return cls(**values)


IRNET_LABEL_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=3,
    gaussian_compat=3,
    bilateral_sxy=50,
    bilateral_srgb=5,
    bilateral_compat=10,
    gt_prob=0.7,
)
DEEPLAB_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=1,
    gaussian_compat=3,
    bilateral_sxy=67,
    bilateral_srgb=3,
    bilateral_compat=4,
)

# SEC's CRF wrapper: bilateral w 10, theta_xy 80/scale, theta_rgb 13; Gaussian w 3, theta_xy
# 3/scale; 10 mean-field iterations. Training runs it at scale 12 on the stride-8 grid (41x41 for
# a 321 input), so the spatial bandwidths shrink with the grid; testing at scale 1.
SEC_TRAIN_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=3 / 12,
    gaussian_compat=3,
    bilateral_sxy=80 / 12,
    bilateral_srgb=13,
    bilateral_compat=10,
)
SEC_TEST_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=3,
    gaussian_compat=3,
    bilateral_sxy=80,
    bilateral_srgb=13,
    bilateral_compat=10,
)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"image must be uint8 RGB (the bilateral kernel uses raw colours), got {image.dtype}"
        )
    # pydensecrf takes a writable C-contiguous buffer (read_rgb's PIL-backed array is read-only).
    return np.require(image, np.uint8, ["C", "W"])


def _inference(
    image: np.ndarray, unary: np.ndarray, n_labels: int, params: CRFParams
) -> np.ndarray:
    """Run mean-field inference; returns Q as float32 (n_labels, H, W)."""
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=image,
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_labels(
    image: np.ndarray, labels: np.ndarray, n_labels: int, params: CRFParams = IRNET_LABEL_CRF
) -> np.ndarray:
    """CRF-refine a hard label map (IRNet ``crf_inference_label``); returns uint8 (H, W).

    ``image``: uint8 (H, W, 3) RGB; ``labels``: integer (H, W) with values in [0, n_labels).
    With ``n_labels == 1`` there is nothing to decide and zeros are returned (pydensecrf's
    label unary divides by n_labels − 1).
    """
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image {image.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if not 1 <= n_labels <= 256:
        raise ValueError(f"n_labels must be in [1, 256] (uint8 output), got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(
            f"labels must lie in [0, {n_labels}), got [{labels.min()}, {labels.max()}]"
        )
    if n_labels == 1:
        return np.zeros(labels.shape, np.uint8)
    unary = unary_from_labels(
        labels.astype(np.int64), n_labels, gt_prob=params.gt_prob, zero_unsure=False
    )
    q = _inference(image, unary, n_labels, params)
    return np.argmax(q, axis=0).astype(np.uint8)


def crf_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams = DEEPLAB_CRF) -> np.ndarray:
    """CRF-refine class probabilities (deeplab-pytorch ``DenseCRF``); returns float32 (C, H, W).

    ``probs``: softmax output (C, H, W) at image resolution; values are clipped to [1e-5, 1]
    before −log, as ``unary_from_softmax`` does. The result sums to 1 over C at each pixel.
    """
    image = _check_image(image)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be (C, H, W) with H, W = {image.shape[:2]}, got {probs.shape}"
        )
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf")
    if probs.size and probs.min() < 0:
        raise ValueError(f"probs must be non-negative (softmax output), min is {probs.min()}")
    unary = unary_from_softmax(probs.astype(np.float32))
    return _inference(image, unary, probs.shape[0], params)


def crf_from_unary(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field inference from a given unary *energy* (C, H, W); returns float32 Q (C, H, W).

    For callers whose energy is not a clipped softmax (SEC's CRF layer takes −logit, i.e.
    −log softmax up to a per-pixel constant). Lower energy = more likely; the result sums to 1
    over C at each pixel. ``image``: uint8 (H, W, 3) RGB at the unary's resolution.
    """
    image = _check_image(image)
    unary = np.asarray(unary)
    if unary.ndim != 3 or unary.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"unary must be (C, H, W) with H, W = {image.shape[:2]}, got {unary.shape}"
        )
    if unary.shape[0] < 1:
        raise ValueError("unary has no classes (C = 0)")
    if not np.issubdtype(unary.dtype, np.floating):
        raise TypeError(f"unary must be floating point, got {unary.dtype}")
    if not np.isfinite(unary).all():
        raise ValueError("unary contains NaN or inf (clip probabilities before taking −log)")
    return _inference(image, unary.reshape(unary.shape[0], -1), unary.shape[0], params)


def crf_refine_logits(image: np.ndarray, logits, params: CRFParams = DEEPLAB_CRF) -> np.ndarray:
    """deeplab-pytorch's post-processing of segmenter logits (C, h, w), a torch tensor at any
    stride: bilinear upsampling to the image, softmax, :func:`crf_probs`, argmax -> uint8 (H, W)."""
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(logits, dtype=torch.float32)
    size = tuple(np.asarray(image).shape[:2])
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(logits, dim=0).cpu().numpy()
    return crf_probs(image, probs, params).argmax(axis=0).astype(np.uint8)


def make_ir_label(
    image: np.ndarray,
    cams: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    params: CRFParams = IRNET_LABEL_CRF,
) -> np.ndarray:
    """IRNet ``cam_to_ir_label`` for one image; returns uint8 (H, W) in {0, *keys, 255}.

    ``cams``: (K, H, W) high-res CAMs of the image's classes, each max-normalised;
    ``keys``: (K,) 1-based class ids of those channels. Two CRF passes on argmax maps with a
    constant background plane: ``fg_threshold`` (confident foreground) and ``bg_threshold``
    (confident background). Pixels that are background in the fg pass become 255 (ignore),
    unless the bg pass also says background, then 0.
    """
    image = _check_image(image)
    cams = np.asarray(cams)
    keys_arr = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams must be (K, H, W) with H, W = {image.shape[:2]}, got {cams.shape}")
    if cams.shape[0] != keys_arr.size:
        raise ValueError(f"{cams.shape[0]} CAM channels but {keys_arr.size} keys")
    if keys_arr.size and (keys_arr.min() < 1 or keys_arr.max() > 254):
        raise ValueError(f"keys must be 1-based class ids in [1, 254], got {keys_arr.tolist()}")
    if not np.isfinite(cams).all():
        raise ValueError("cams contains NaN or inf")
    label_ids = np.concatenate([[0], keys_arr])

    def confident(threshold: float) -> np.ndarray:
        padded = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
        pred = crf_labels(image, np.argmax(padded, axis=0), n_labels=label_ids.size, params=params)
        return label_ids[pred]

    fg_conf = confident(fg_threshold)
    bg_conf = confident(bg_threshold)
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[(fg_conf == 0) & (bg_conf == 0)] = 0
    return conf.astype(np.uint8)


def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    chunksize: int | None = None,
    start_method: str = "spawn",
) -> list[R]:
    """``[fn(item) for item in items]`` over a process pool, results in input order.

    ``workers <= 1`` runs inline. ``fn`` and the items must be picklable (a module-level
    function, or ``functools.partial`` of one); pass light items (ids, paths) and load inside
    ``fn`` rather than shipping arrays. ``spawn`` (default) is safe after CUDA/OpenMP
    initialisation; ``fork`` starts faster when the parent holds no threads or CUDA context.
    """
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    if chunksize is None:
        chunksize = max(1, len(items) // (workers * 4))  # a few chunks per worker balances load
    if multiprocessing.get_start_method(allow_none=True) not in (
        None,
        "fork",
        "spawn",
        "forkserver",
    ):
        # A `hydra/launcher=joblib` job runs in a loky process whose default start method is
        # "loky"; spawned children copy that default and die on it (ValueError: cannot find
        # context for 'loky'), so the pool's children get the platform's.
        multiprocessing.set_start_method(None, force=True)
    ctx = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))
