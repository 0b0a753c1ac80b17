"""COCO reader memory at 1x, 10x and 100x a tiny set: flat, since annotations stay on disk.

A COCO-like instances json is generated (``--base`` images of 64x80 with COCO's density: ~7
instances per image, ``--points``-vertex polygons, a crowd RLE in every 10th image, so the json
holds ~4 KB per image as COCO 2014's does) and replicated to 10x and 100x (new ids, new file
names, hard-linked JPEGs). Per size, each step in a fresh subprocess that reports its own peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``prepare``: ``prepare_coco``, the one-off step (one process, e.g. rank 0) that parses the
  json with pycocotools and writes the index + RLE segment store. It holds the json, so it grows.
* ``epoch``: build ``COCOSegmentation`` and read every sample once (masks rasterised from the
  segment store into the PNG cache), what each training process / DDP rank does.
* ``cached`` (``--cached``): the same again, masks read from the PNG cache.

``old held`` is what the previous reader kept in every data set copy (each rank and, pickled,
each DataLoader worker): the per-image (label, iscrowd, segmentation) lists, measured with a
deep ``sys.getsizeof``; ``pickled`` is what the new data set sends to a worker. ``rise`` is a
child's peak minus its RSS after the imports (VmHWM reset via /proc/self/clear_refs).

    python bench/coco_memory.py [--base 20] [--scales 1 10 100] [--points 32] [--cached]
                                [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, W = 64, 80
MB = 2**20
CATEGORIES = [{"id": cid, "name": f"class{cid}"} for cid in (1, 2, 3, 5, 8, 17, 44, 90)]


def _polygon(rng: np.random.Generator, points: int) -> list[float]:
    cy, cx = rng.uniform(0.2, 0.8) * H, rng.uniform(0.2, 0.8) * W
    r = rng.uniform(0.1, 0.4) * min(H, W) * rng.uniform(0.6, 1.0, points)
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    xy = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    return np.clip(xy, 0, [W - 1, H - 1]).round(2).ravel().tolist()


def _crowd_rle(rng: np.random.Generator) -> dict:
    m = np.zeros((H, W), np.uint8)
    y, x = int(rng.integers(0, H // 2)), int(rng.integers(0, W // 2))
    m[y : y + H // 3, x : x + W // 3] = 1
    flat = m.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": [H, W]}


def make_base(root: Path, n: int, points: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``n`` JPEGs in root/base and their (images, annotations) entries."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "base").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "base" / f"{i:06d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": H, "width": W})
        for _ in range(int(rng.integers(4, 11))):
            segm = [_polygon(rng, points) for _ in range(int(rng.integers(1, 3)))]
            anns.append(
                {
                    "image_id": i,
                    "category_id": int(rng.choice(CATEGORIES)["id"]),
                    "iscrowd": 0,
                    "segmentation": segm,
                    "area": 0.0,
                    "bbox": [0, 0, 1, 1],
                }
            )
        if i % 10 == 0:
            anns.append(
                {
                    "image_id": i,
                    "category_id": CATEGORIES[0]["id"],
                    "iscrowd": 1,
                    "segmentation": _crowd_rle(rng),
                    "area": 0.0,
                    "bbox": [0, 0, 1, 1],
                }
            )
    return images, anns  # fmt: skip


def make_scaled(root: Path, scale: int, images: list[dict], anns: list[dict]) -> Path:
    """``scale`` copies of the base set (ids and file names made unique) under root/x{scale}."""
    out = root / f"x{scale}"
    (out / "images").mkdir(parents=True, exist_ok=True)
    n = len(images)
    all_images, all_anns = [], []
    for c in range(scale):
        for im in images:
            name = f"COCO_bench_{c * n + im['id']:012d}.jpg"
            dst = out / "images" / name
            try:
                os.link(root / "base" / im["file_name"], dst)
            except OSError:
                shutil.copyfile(root / "base" / im["file_name"], dst)
            all_images.append({**im, "id": c * n + im["id"], "file_name": name})
        for a in anns:
            all_anns.append({**a, "id": len(all_anns) + 1, "image_id": c * n + a["image_id"]})
    (out / "annotations").mkdir(exist_ok=True)
    coco = {"images": all_images, "annotations": all_anns, "categories": CATEGORIES}
    (out / "annotations" / "instances_bench.json").write_text(json.dumps(coco))
    return out


def deep_size(obj: object) -> int:
    """sys.getsizeof over the object graph (lists, tuples, dicts, scalars), each object once."""
    seen, stack, total = set(), [obj], 0
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


# -- the measured children ---------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(step: str, root: Path, cache: Path) -> dict:
    from src.datamodules.coco import COCOSegmentation, load_coco, prepare_coco

    ann = root / "annotations" / "instances_bench.json"
    result: dict = {"import_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base_kib = _status_kib("VmRSS")
    except OSError:
        base_kib = None
    start = time.perf_counter()
    if step == "prepare":
        prepare_coco(ann, cache)
    elif step.startswith("epoch"):
        ds = COCOSegmentation(root, "images", "annotations/instances_bench.json", cache_dir=cache)
        for i in range(len(ds)):
            ds[i]
        result["rasterised"] = ds.masks_rasterised
        result["pickled"] = len(pickle.dumps(ds))
    result["seconds"] = time.perf_counter() - start
    result["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = _status_kib("VmHWM")
    # The rise of the peak over the RSS after the imports (ru_maxrss difference as fallback).
    result["rise_kib"] = (
        hwm - base_kib
        if hwm is not None and base_kib is not None
        else result["peak_kib"] - result["import_kib"]
    )
    if step == "prepare":  # after the peak is taken: what the previous reader kept per copy
        coco = load_coco(ann)
        labels = {cid: k + 1 for k, cid in enumerate(sorted(coco.cats))}
        old = [
            [
                (labels[a["category_id"]], bool(a.get("iscrowd", 0)), a["segmentation"])
                for a in coco.imgToAnns.get(i, [])
            ]
            for i in sorted(coco.imgs)
        ]
        result["old_held"] = deep_size(old)
    return result


def run_child(step: str, root: Path, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--root", str(root), "--cache", str(cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{step} on {root} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=20, help="images at 1x")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--points", type=int, default=32, help="vertices per polygon")
    p.add_argument("--cached", action="store_true", help="also an epoch from the PNG cache")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.cache)))
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="coco_memory_"))
    t0 = time.perf_counter()
    rows = []
    try:
        images, anns = make_base(work, args.base, args.points)
        for scale in args.scales:
            root = make_scaled(work, scale, images, anns)
            cache = work / f"cache{scale}"
            steps = {"prepare": run_child("prepare", root, cache)}
            steps["epoch"] = run_child("epoch", root, cache)
            if args.cached:
                steps["cached"] = run_child("epoch_cached", root, cache)
            json_mb = (root / "annotations" / "instances_bench.json").stat().st_size / MB
            rows.append((scale, len(images) * scale, json_mb, steps))
            print(f"  {scale}x measured ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nCOCO reader memory: {args.base} images at 1x, {args.points}-vertex polygons, "
        f"{len(anns) / args.base:.1f} annotations/image. peak = ru_maxrss of the child; "
        "rise = its peak minus its RSS after the imports (torch, lightning: ~the same in all)."
    )
    cols = [
        ("size", 5),
        ("images", 7),
        ("json MB", 8),
        ("old held MB", 12),
        ("prepare rise MB", 16),
        ("epoch peak MB", 14),
        ("epoch rise MB", 14),
    ]
    if args.cached:
        cols += [("cached peak MB", 15), ("cached rise MB", 15)]
    cols += [("pickled KB", 11)]
    head = " ".join(f"{name:>{w}}" for name, w in cols)
    print(head)
    print("-" * len(head))
    for scale, n, json_mb, st in rows:
        ep = st["epoch"]
        assert ep["rasterised"] == n, ep  # every mask was built from the segment store
        vals = [
            f"{scale}x",
            n,
            f"{json_mb:.2f}",
            f"{st['prepare']['old_held'] / MB:.2f}",
            f"{st['prepare']['rise_kib'] / 1024:.1f}",
            f"{ep['peak_kib'] / 1024:.1f}",
            f"{ep['rise_kib'] / 1024:.1f}",
        ]
        if args.cached:
            assert st["cached"]["rasterised"] == 0, st["cached"]  # all read from the PNG cache
            vals += [
                f"{st['cached']['peak_kib'] / 1024:.1f}",
                f"{st['cached']['rise_kib'] / 1024:.1f}",
            ]
        vals += [f"{ep['pickled'] / 1024:.1f}"]
        print(" ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols, strict=True)))
    (s1, _, _, first), (sn, _, _, last) = rows[0], rows[-1]
    print(
        f"\n{sn}x/{s1}x: epoch peak RSS {last['epoch']['peak_kib'] / first['epoch']['peak_kib']:.3f}x"
        f" (rise {first['epoch']['rise_kib'] / 1024:.1f} -> {last['epoch']['rise_kib'] / 1024:.1f} MB)"
        f"; the old reader held {first['prepare']['old_held'] / MB:.2f} -> "
        f"{last['prepare']['old_held'] / MB:.2f} MB of annotations per data set copy "
        f"({last['prepare']['old_held'] / first['prepare']['old_held']:.0f}x); the one-off "
        f"prepare step holds the parsed json (rise {first['prepare']['rise_kib'] / 1024:.1f} -> "
        f"{last['prepare']['rise_kib'] / 1024:.1f} MB)."
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
