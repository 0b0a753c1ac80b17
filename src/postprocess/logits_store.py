"""How predict_segmenter stores the val logits the CRF reads (`segmenter.inference`).

Only the classes whose softmax reaches `logits_min_prob` somewhere in the image are kept, with
their ids (`classes`): every pixel's argmax class is among them (its probability is at least
1 / C), and a dropped class had less than the floor everywhere, which the CRF's pairwise term
cannot grow. `logits_dtype`: `float16` keeps the kept logits; `uint8` keeps their
log-probabilities clipped at log(min_prob), in 255 steps (`scale` nats each), zlib-compressed.
The CRF takes a softmax, which a per-pixel shift leaves unchanged, so log-probabilities serve as
logits. Measured in bench/logits_store.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LOGIT_STORES = ("float16", "uint8")
Fail = Callable[[str], None]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))


def check_logits_store(dtype: str, min_prob: float) -> None:
    """ValueError naming the `segmenter.inference` key when the settings cannot store logits."""
    if dtype not in LOGIT_STORES:
        raise ValueError(f"segmenter.inference.logits_dtype={dtype!r}: use one of {LOGIT_STORES}")
    if not 0.0 <= min_prob < 1.0 or (dtype == "uint8" and min_prob <= 0):
        raise ValueError(
            f"segmenter.inference.logits_min_prob={min_prob} must be in [0, 1) (in (0, 1) for "
            "logits_dtype=uint8: it is the floor of the stored log-probabilities)"
        )


def encode_logits(logits: np.ndarray, dtype: str, min_prob: float) -> dict[str, np.ndarray]:
    """The arrays of one image's logits file (see the module docstring)."""
    check_logits_store(dtype, min_prob)
    logits = np.asarray(logits, dtype=np.float32)
    if not np.isfinite(logits).all():
        # Every finite softmax keeps at least one class (its max is >= 1 / C); a NaN one keeps
        # none, and decode_logits rightly refuses a file without classes.
        raise ValueError(
            "the segmenter predicts non-finite logits (a diverged model): nothing is stored. "
            "Fix: retrain train_segmenter (force=[train_segmenter]) with settings that train"
        )
    log_p = _log_softmax(logits.astype(np.float64))
    if min_prob > 0:
        keep = np.flatnonzero(log_p.reshape(len(logits), -1).max(axis=1) >= np.log(min_prob))
        # Every pixel's argmax class too: already kept unless min_prob > 1 / C, and never none.
        keep = np.union1d(keep, np.unique(log_p.argmax(axis=0)))
    else:
        keep = np.arange(len(logits))
    out = {"classes": keep.astype(np.int16)}
    if dtype == "float16":
        out["logits"] = logits[keep].astype(np.float16)
        return out
    scale = -np.log(min_prob) / 255
    out["logits"] = np.round(np.clip(-log_p[keep], 0, 255 * scale) / scale).astype(np.uint8)
    out["scale"] = np.float32(scale)
    return out


def decode_logits(
    arrays: dict[str, np.ndarray], num_classes: int, fail: Fail
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (K, h, w) values whose softmax is the stored probabilities, (K,) class ids);
    `fail(message)` raises for arrays that do not fit. Files without `classes` hold all."""
    stored = arrays["logits"]
    classes = arrays.get("classes", np.arange(len(stored)))
    if (
        stored.ndim != 3
        or not len(classes)
        or classes.shape != (len(stored),)
        or len(np.unique(classes)) != len(classes)
        or classes.min() < 0
        or classes.max() >= num_classes
    ):
        fail(
            f"logits {stored.shape} with classes {classes.tolist()[:10]} do not fit "
            f"data.num_classes={num_classes}"
        )
    if stored.dtype == np.uint8:
        scale = arrays.get("scale")
        if scale is None or scale.shape != () or not np.isfinite(scale) or scale <= 0:
            fail("uint8 logits need a positive scalar `scale`")
        return -stored.astype(np.float32) * np.float32(scale), classes.astype(np.int64)
    if stored.dtype.kind != "f":
        fail(f"logits of dtype {stored.dtype}: expected float16/32 or uint8")
    return stored.astype(np.float32), classes.astype(np.int64)
