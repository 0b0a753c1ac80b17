"""Sparse vs dense IRNet random walk: time, peak memory, agreement (prints, no asserts).

VOC size is a 512×512 image -> stride-4 grid 128×128 (N = 16,384) with 20 classes. The dense
reference at N = 16,384 does 8 squarings of a 1 GiB matrix (~7e13 FLOP, ~10 min on 2 cores),
so by default it runs at a smaller grid (--dense-size, 64) and its cost at --size is printed
as a clearly labelled extrapolation (time ∝ N³, memory ∝ N²); --full runs it at --size.

Each measurement runs in its own subprocess: peak memory is the rise of the peak RSS over
the RSS before the call (Linux: VmHWM reset via /proc/self/clear_refs), or
torch.cuda.max_memory_allocated on CUDA.

    python bench/random_walk.py                  # sparse 128, dense 64 (+ sparse 64)
    python bench/random_walk.py --full           # dense at 128 too (slow on CPU)
    python bench/random_walk.py --device cuda --full
    python bench/random_walk.py --batch 8 [--device cuda]   # make_pseudo_masks' batched walk

With --batch B it times instead the walk as make_pseudo_masks runs it: B grids of VOC's common
image sizes at stride 4 (500x375 -> 94x125, 375x500, 500x333, 500x500, ...; a batch mixes them
as the data loader does) walked one at a time (`random_walk`) and in one pass
(`random_walk_batch`), images/s of each, their ratio and the largest difference between them.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.postprocess.random_walk import (  # noqa: E402
    pseudo_label_from_rw,
    random_walk,
    random_walk_batch,
    random_walk_dense,
)

# Stride-4 grids ((H - 1) // 4 + 1, ...) of VOC's most common image sizes (W x H): 500x375,
# 375x500, 500x333, 500x500, 333x500, 500x332.
VOC_GRIDS = [(94, 125), (125, 94), (84, 125), (125, 125), (125, 84), (83, 125)]


def _smooth(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = noise[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="circular"), k)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="circular"), k.transpose(2, 3))
    return x[:, 0]


def make_inputs(size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded smooth CAMs (per-class max-normalised, like make_cam) and a contour-like
    boundary map (thin ridges on the zero set of a smooth field, plus low noise)."""
    g = torch.Generator().manual_seed(seed)
    fields = _smooth(torch.randn(classes, size, size, generator=g), size / 12)
    cams = fields.clamp(min=0) ** 2
    cams = cams / (cams.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    f = _smooth(torch.randn(1, size, size, generator=g), size / 16)[0]
    f = f / f.std()
    boundary = torch.exp(-((f / 0.15) ** 2)) + 0.05 * torch.rand(size, size, generator=g)
    return cams, boundary.clamp(0, 1)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    fn = {
        "sparse": random_walk,
        "dense": random_walk_dense,
        "dense64": functools.partial(random_walk_dense, dtype=torch.float64),
    }[args.worker]
    # Warm-up on a tiny grid: CUDA context, kernels, allocator, path-index construction.
    cams, boundary = make_inputs(16, 2, 0)
    fn(cams.to(device), boundary.to(device), exp_times=1)
    cams, boundary = make_inputs(args.size, args.classes, args.seed)
    cams, boundary = cams.to(device), boundary.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    times = []
    for i in range(args.repeat):
        start = time.perf_counter()
        rw = fn(cams, boundary, exp_times=args.exp_times)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0:  # peak of one call (later calls reuse freed memory)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            else:
                try:
                    peak = _rss_kib("VmHWM") * 1024 - base
                except RuntimeError:
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = min(times)  # least disturbed by other load on the machine
    np.save(args.out, rw.cpu().numpy())
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def measure(method: str, size: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--size",
        str(size),
        "--classes",
        str(args.classes),
        "--seed",
        str(args.seed),
        "--exp-times",
        str(args.exp_times),
        "--device",
        args.device,
        "--repeat",
        str(1 if method == "dense64" or (method == "dense" and size >= 128) else args.repeat),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method}@{size} failed:\n{res.stderr}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["rw"] = torch.from_numpy(np.load(out))
    return result


def compare(sparse: torch.Tensor, dense: torch.Tensor) -> tuple[float, float, float]:
    raw = (sparse - dense).abs().max().item()
    norm = (sparse / sparse.max() - dense / dense.max()).abs().max().item()
    keys = list(range(1, sparse.shape[0] + 1))
    size = (4 * sparse.shape[1], 4 * sparse.shape[2])
    agree = np.mean(
        pseudo_label_from_rw(sparse, keys, size) == pseudo_label_from_rw(dense, keys, size)
    )
    return raw, norm, float(agree)


def batched_walk(args: argparse.Namespace) -> None:
    """Images/s of the walk one image at a time vs in one batched pass, same inputs."""
    device = torch.device(args.device)
    grids = [VOC_GRIDS[i % len(VOC_GRIDS)] for i in range(args.batch)]
    side = max(max(g) for g in grids)
    inputs = [make_inputs(side, args.classes, args.seed + i) for i in range(args.batch)]
    cams = [
        c[:, :h, :w].contiguous().to(device) for (c, _), (h, w) in zip(inputs, grids, strict=True)
    ]
    boundaries = [
        b[:h, :w].contiguous().to(device) for (_, b), (h, w) in zip(inputs, grids, strict=True)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> tuple[float, list[torch.Tensor]]:
        best, out = float("inf"), []
        for _ in range(args.repeat):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best, out

    def one() -> list[torch.Tensor]:
        pairs = zip(cams, boundaries, strict=True)
        return [random_walk(c, b, exp_times=args.exp_times) for c, b in pairs]

    def batch() -> list[torch.Tensor]:
        return random_walk_batch(cams, boundaries, exp_times=args.exp_times)

    random_walk_batch(cams[:1], boundaries[:1], exp_times=1)  # warm-up: kernels, path index
    t_one, rw_one = timed(one)
    t_batch, rw_batch = timed(batch)
    diff = max((a - b).abs().max().item() for a, b in zip(rw_one, rw_batch, strict=True))
    print(
        f"device={args.device} grids {sorted(set(grids))}, {args.classes} classes, "
        f"2^{args.exp_times} steps, "
        f"batch {args.batch}, min of {args.repeat} calls"
    )
    print(f"  one at a time: {args.batch / t_one:8.2f} images/s")
    print(f"  batched:       {args.batch / t_batch:8.2f} images/s  ({t_one / t_batch:.2f}x)")
    print(f"  max |batched - one at a time|: {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=128, help="grid side for the sparse walk (VOC: 128)")
    p.add_argument("--dense-size", type=int, default=64, help="grid side for the dense reference")
    p.add_argument("--full", action="store_true", help="run the dense reference at --size too")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--exp-times", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed calls per run, min reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, help="time the batched walk of this many VOC grids")
    p.add_argument("--worker", choices=["sparse", "dense", "dense64"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.batch:
        batched_walk(args)
        return

    dense_size = args.size if args.full else args.dense_size
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"classes={args.classes} beta=10 exp_times={args.exp_times} (2^{args.exp_times} steps), "
        f"time = min of {args.repeat} calls (dense64, dense at >=128: 1), peak memory of the first"
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("sparse", args.size), ("sparse", dense_size), ("dense", dense_size)]
        if not args.full:
            plan.append(("dense64", dense_size))  # exact-ish reference for the error figures
        for method, size in plan:
            if (method, size) not in runs:
                runs[method, size] = measure(method, size, args, Path(tmp) / f"{method}{size}.npy")

    print(f"\n{'grid':>9} {'N':>7} {'method':>7} {'time s':>9} {'peak MiB':>9}")
    for (method, size), r in runs.items():
        mib = r["peak_bytes"] / 2**20
        print(f"{size:>4}x{size:<4} {size * size:>7} {method:>7} {r['seconds']:>9.2f} {mib:>9.1f}")

    sp, de = runs["sparse", dense_size], runs["dense", dense_size]
    raw, norm, agree = compare(sp["rw"], de["rw"])
    print(f"\nmeasured at {dense_size}x{dense_size} (N={dense_size**2}), same inputs:")
    print(f"  peak memory dense/sparse: {de['peak_bytes'] / max(sp['peak_bytes'], 1):.1f}x")
    print(f"  time dense/sparse:        {de['seconds'] / sp['seconds']:.1f}x")
    print(f"  max |sparse - dense|: raw {raw:.2e}, after global-max normalisation {norm:.2e}")
    print(f"  pseudo-label agreement:   {100 * agree:.4f}% of {16 * dense_size**2} pixels")
    if ("dense64", dense_size) in runs:
        exact = runs["dense64", dense_size]["rw"]
        for name, r in (("sparse fp32", sp), ("dense fp32", de)):
            raw, norm, agree = compare(r["rw"].double(), exact)
            print(
                f"  {name} vs float64 dense: raw {raw:.2e}, normalised {norm:.2e}, "
                f"labels {100 * agree:.4f}%"
            )

    if dense_size != args.size:
        scale = (args.size / dense_size) ** 2  # N ratio
        big = runs["sparse", args.size]
        t_dense = de["seconds"] * scale**3
        m_dense = de["peak_bytes"] * scale**2
        print(
            f"\nEXTRAPOLATION (not measured): dense at {args.size}x{args.size} "
            f"(N={args.size**2}) from {dense_size}x{dense_size} with time ∝ N³, memory ∝ N²:"
        )
        print(f"  dense ≈ {t_dense:.0f} s, ≈ {m_dense / 2**20:.0f} MiB")
        print(
            f"  vs measured sparse {big['seconds']:.2f} s, {big['peak_bytes'] / 2**20:.1f} MiB -> "
            f"time ≈ {t_dense / big['seconds']:.0f}x, memory ≈ {m_dense / max(big['peak_bytes'], 1):.0f}x"
        )
        print("  (run with --full to measure the dense walk at this size)")


if __name__ == "__main__":
    main()
