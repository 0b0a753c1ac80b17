"""Dense-CRF throughput with 1 and 2 worker processes (prints, no asserts).

Synthetic 256×256 images (seeded colour blobs + noise). Three workloads:

* ``ir_label_crf``: one IRNet label CRF (crf_labels, IRNET_LABEL_CRF, 3 labels);
* ``make_ir_label``: the full cam_to_ir_label step per image (2 label CRFs);
* ``deeplab_crf``: crf_probs with DEEPLAB_CRF on a 21-class softmax.

Items are seeds; workers build their inputs (≈ms, reported separately) so no arrays are
pickled. Pooled timings include starting the pool (printed as a separate line).

    python bench/crf.py [--images 32] [--size 256] [--workers 1 2] [--start-method fork]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.postprocess.crf import (  # noqa: E402
    DEEPLAB_CRF,
    IRNET_LABEL_CRF,
    crf_labels,
    crf_probs,
    make_ir_label,
    run_parallel,
)


def synthetic(seed: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of `classes` soft colour blobs and matching noisy per-class scores (C, H, W)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    centres = rng.random((classes, 2))
    dist = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
    scores = np.exp(-dist / 0.02) + 0.3 * rng.random((classes, size, size))
    region = scores.argmax(0)
    colours = rng.integers(0, 256, (classes, 3))
    image = colours[region] + rng.integers(-20, 21, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), scores.astype(np.float32)


def ir_label_crf(seed: int, size: int) -> np.ndarray:
    image, scores = synthetic(seed, size, 3)
    return crf_labels(image, scores.argmax(0), 3, IRNET_LABEL_CRF)


def ir_label_full(seed: int, size: int) -> np.ndarray:
    image, scores = synthetic(seed, size, 2)
    cams = scores / scores.reshape(2, -1).max(1)[:, None, None]
    return make_ir_label(image, cams, [3, 12])


def deeplab_crf(seed: int, size: int) -> np.ndarray:
    image, scores = synthetic(seed, size, 21)
    logits = 8 * scores
    probs = np.exp(logits - logits.max(0))
    return crf_probs(image, probs / probs.sum(0), DEEPLAB_CRF)


def _noop(seed: int) -> int:
    return seed


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    args = p.parse_args()
    seeds = list(range(args.images))
    print(f"{args.images} images of {args.size}x{args.size}, cpu_count={os.cpu_count()}")
    # Other processes on the machine cap the achievable speed-up: show how busy it was.
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    start = time.perf_counter()
    for s in seeds[:4]:
        synthetic(s, args.size, 21)
    gen_ms = (time.perf_counter() - start) / 4 * 1e3
    print(f"input generation (21 classes, included below): {gen_ms:.1f} ms/image")
    for w in args.workers:
        if w > 1:
            start = time.perf_counter()
            run_parallel(_noop, seeds, w, start_method=args.start_method)
            took = time.perf_counter() - start
            print(f"pool start-up, {w} workers ({args.start_method}, included below): {took:.2f} s")

    print(f"\n{'workload':>14} {'workers':>8} {'images/s':>9} {'s/image':>8} {'speed-up':>9}")
    for name, fn in [
        ("ir_label_crf", ir_label_crf),
        ("make_ir_label", ir_label_full),
        ("deeplab_crf", deeplab_crf),
    ]:
        job = functools.partial(fn, size=args.size)
        base = None
        for w in args.workers:
            start = time.perf_counter()
            run_parallel(job, seeds, w, start_method=args.start_method)
            rate = args.images / (time.perf_counter() - start)
            base = base or rate
            print(f"{name:>14} {w:>8} {rate:>9.2f} {1 / rate:>8.3f} {rate / base:>8.2f}x")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
