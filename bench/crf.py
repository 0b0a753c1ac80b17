"""Dense-CRF throughput with 1 and 2 worker processes (prints, no asserts).

Random-texture images (seeded colour blobs + noise) of ``--size`` (256 = 256×256; WxH such as
500x375 for VOC-sized ones), and the synthetic data set's own images. Four workloads:

* ``ir_label_crf``: one IRNet label CRF (crf_labels, IRNET_LABEL_CRF, 3 labels);
* ``make_ir_label``: the full cam_to_ir_label step per image (2 label CRFs);
* ``deeplab_crf``: the segmenter's CRF, crf_probs with DEEPLAB_CRF on a 21-class softmax made as
  the segmenter makes it: logits at stride 8 (random), upsampled bilinearly to the image size;
* ``deeplab_synth``: the same on the synthetic set's train images (their size, data.num_classes;
  the set is generated on first use as the pipeline does), independent of ``--size``.

The CRF runs a fixed number of mean-field iterations, so its cost depends on the image (the
bilateral lattice) and the number of labels, not on the probability values. Items are seeds;
workers build or read their inputs (≈ms, reported separately) so no arrays are pickled. Pooled
timings include starting the pool (printed as a separate line).

    python bench/crf.py [--images 32] [--size 256 | --size 500x375] [--workers 1 2]
                        [--start-method fork] [--workloads deeplab_crf deeplab_synth] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.postprocess.crf import (  # noqa: E402
    DEEPLAB_CRF,
    IRNET_LABEL_CRF,
    crf_labels,
    crf_probs,
    make_ir_label,
    run_parallel,
)


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '500x375' (width x height, as VOC sizes are quoted) -> (375, 500)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT (>= 8), got {text!r}")
    w, h = parts * 2 if len(parts) == 1 else parts
    return h, w


def synthetic(seed: int, size: tuple[int, int], classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) image of `classes` soft colour blobs and matching noisy per-class scores."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    centres = rng.random((classes, 2)) * (h, w) / max(h, w)
    dist = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
    scores = np.exp(-dist / 0.02) + 0.3 * rng.random((classes, h, w))
    region = scores.argmax(0)
    colours = rng.integers(0, 256, (classes, 3))
    image = colours[region] + rng.integers(-20, 21, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), scores.astype(np.float32)


def segmenter_probs(seed: int, size: tuple[int, int], classes: int) -> np.ndarray:
    """(C, H, W) softmax of random logits at output stride 8, upsampled bilinearly to (H, W)
    (cv2's INTER_LINEAR = F.interpolate(align_corners=False)), as DeepLab's CRF input."""
    h, w = size
    rng = np.random.default_rng(seed + 1_000_003)
    logits = 4 * rng.standard_normal((-(-h // 8), -(-w // 8), classes)).astype(np.float32)
    logits = cv2.resize(logits, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, classes)
    probs = np.exp(logits - logits.max(2, keepdims=True))
    return np.ascontiguousarray((probs / probs.sum(2, keepdims=True)).transpose(2, 0, 1))


def ir_label_crf(seed: int, size: tuple[int, int]) -> np.ndarray:
    image, scores = synthetic(seed, size, 3)
    return crf_labels(image, scores.argmax(0), 3, IRNET_LABEL_CRF)


def ir_label_full(seed: int, size: tuple[int, int]) -> np.ndarray:
    image, scores = synthetic(seed, size, 2)
    cams = scores / scores.reshape(2, -1).max(1)[:, None, None]
    return make_ir_label(image, cams, [3, 12])


def deeplab_crf(seed: int, size: tuple[int, int]) -> np.ndarray:
    image, _ = synthetic(seed, size, 21)
    return crf_probs(image, segmenter_probs(seed, size, 21), DEEPLAB_CRF)


def deeplab_synth(seed: int, paths: tuple[str, ...], classes: int) -> np.ndarray:
    image = cv2.cvtColor(cv2.imread(paths[seed % len(paths)]), cv2.COLOR_BGR2RGB)
    return crf_probs(image, segmenter_probs(seed, image.shape[:2], classes), DEEPLAB_CRF)


def synthetic_set() -> tuple[tuple[str, ...], int]:
    """Image paths and class count of the synthetic train split (generated if missing), from the
    config the pipeline composes (conf/train.yaml). Imported here: spawned workers skip Hydra."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from src.datamodules import build_dataset

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train")
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    return tuple(str(p) for p in dataset.image_paths), int(cfg.data.num_classes)


def _noop(seed: int) -> int:
    return seed


WORKLOADS = ("ir_label_crf", "make_ir_label", "deeplab_crf", "deeplab_synth")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=parse_size, default=(256, 256), metavar="N|WxH")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="8 images")
    args = p.parse_args()
    if args.quick:
        args.images = 8
    seeds = list(range(args.images))
    h, w = args.size
    print(f"{args.images} images of {w}x{h}, cpu_count={os.cpu_count()}")
    # Other processes on the machine cap the achievable speed-up: show how busy it was.
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    jobs = {
        "ir_label_crf": (functools.partial(ir_label_crf, size=args.size), f"{w}x{h}"),
        "make_ir_label": (functools.partial(ir_label_full, size=args.size), f"{w}x{h}"),
        "deeplab_crf": (functools.partial(deeplab_crf, size=args.size), f"{w}x{h}"),
    }
    if "deeplab_synth" in args.workloads:
        paths, classes = synthetic_set()
        sh, sw = cv2.imread(paths[0]).shape[:2]
        jobs["deeplab_synth"] = (
            functools.partial(deeplab_synth, paths=paths, classes=classes),
            f"{sw}x{sh}",
        )
        print(f"synthetic set: {len(paths)} train images of {sw}x{sh}, {classes} classes")

    start = time.perf_counter()
    for s in seeds[:4]:
        synthetic(s, args.size, 21)
    gen_ms = (time.perf_counter() - start) / 4 * 1e3
    start = time.perf_counter()
    for s in seeds[:4]:
        segmenter_probs(s, args.size, 21)
    probs_ms = (time.perf_counter() - start) / 4 * 1e3
    print(
        f"input generation (21 classes, included below): {gen_ms:.1f} ms/image, "
        f"+ stride-8 softmax {probs_ms:.1f} ms/image"
    )
    for n in args.workers:
        if n > 1:
            start = time.perf_counter()
            run_parallel(_noop, seeds, n, start_method=args.start_method)
            took = time.perf_counter() - start
            print(f"pool start-up, {n} workers ({args.start_method}, included below): {took:.2f} s")

    print(
        f"\n{'workload':>14} {'size':>9} {'workers':>8} {'images/s':>9} {'s/image':>8} "
        f"{'speed-up':>9}"
    )
    for name in args.workloads:
        job, size = jobs[name]
        base = None
        for n in args.workers:
            start = time.perf_counter()
            run_parallel(job, seeds, n, start_method=args.start_method)
            rate = args.images / (time.perf_counter() - start)
            base = base or rate
            print(f"{name:>14} {size:>9} {n:>8} {rate:>9.2f} {1 / rate:>8.3f} {rate / base:>8.2f}x")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
