"""Paper-scale rates of the CPU stages, bytes per image, and the wall time they project for
`voc_conta` and `coco_conta` (T = 3: rounds 0..3). Prints, never asserts.

Each CPU stage is timed through the function its stage calls per image, on VOC-sized inputs
(500 x 375) written to a temporary folder the way the pipeline writes them: JPEG images, CAM files
from the uint8 store (`cam_encoder`), val logits from the uint8 logits store (`encode_logits`),
label PNGs. Inputs are seeded colour blobs with one to three objects; CAMs are the objects'
masks blurred at stride 4 and max-normalised; logits are blurred one-hot maps plus noise at
stride 8, over 21 (VOC) or 81 (COCO) classes. CRF cost depends on the image size, the number of
labels and the iterations, not on the values, so these inputs time the CRFs as real ones would.

* make_ir_labels  `_ir_label_job` (CAM file -> two label CRFs -> PNG), IRNet's settings
* make_psa_labels `_psa_label_job` (SEAM/PSA's two CRF powers)
* crf_segmenter   `_crf_job` (logits file -> DeepLab CRF -> PNG), 21 and 81 classes
* eval_cams       CAM file -> `ThresholdSweep.update` (the 0.05-step sweep)
* eval_pseudo / eval_segmenter   PNG -> `SegmentationMetric.update`

Settings come from the composed experiments (`voc_conta`, `voc method=seam`, `coco_conta`). The
projection divides each stage's images by the per-process rate times its processes: the CRF
pools use the node's processes (`--node-processes`, split among the ranks), the evaluations
one process per rank. It assumes the per-process rate holds with many processes (the work is
per image and CPU-bound; this machine has 2 cores, so the scaling is measured only to 2).

With `--device cuda` the GPU stages (training, CAM and walk inference, segmenter prediction,
confounders) are timed too, at paper shapes in each trainer precision (bench/gpu_stages.py), and
the projection adds their hours: images per round / (GPUs x one GPU's rate at its share of the
batch). It leaves out DDP's gradient all-reduce and data loading (done in worker processes).
`--device cpu` runs the same code on the CPU (slow at paper shapes: a check, not a figure).

    python bench/scale.py [--images 12] [--node-processes 8 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.datamodules.palette import read_label_png, save_label_png  # noqa: E402
from src.evaluation.cam import ThresholdSweep  # noqa: E402
from src.evaluation.metrics import SegmentationMetric  # noqa: E402
from src.methods.irnet import _ir_label_job  # noqa: E402
from src.methods.seam import _psa_label_job  # noqa: E402
from src.pipeline.projection import projected_hours  # noqa: E402
from src.pipeline.stages.cam import cam_encoder, load_cam  # noqa: E402
from src.pipeline.stages.segmenter import _crf_job, crf_subset  # noqa: E402
from src.postprocess.crf import CRFParams, run_parallel  # noqa: E402
from src.postprocess.logits_store import encode_logits  # noqa: E402
from src.utils.io import atomic_save_npz  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_stages  # noqa: E402

SIZE = gpu_stages.SIZE  # (H, W) of a typical VOC image
# Images per stage and round; COCO train counts the images with at least one class.
SETS = {
    "voc": {"train": 10_582, "eval": 1_464, "val": 1_449},
    "coco": {"train": 82_081, "eval": 82_081, "val": 40_137},
}
ROUNDS = 4  # T = 3: the baseline round 0 and three CONTA rounds


# -- inputs -------------------------------------------------------------------------------------
def scene(seed: int, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB image, its label map and its class ids (1-based, one to three objects)."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    image = cv2.GaussianBlur(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (0, 0), 1)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    label = np.zeros(SIZE, np.uint8)
    keys = np.sort(rng.choice(np.arange(1, classes), rng.integers(1, 4), replace=False))
    for key in keys:
        centre = (int(rng.integers(60, w - 60)), int(rng.integers(60, h - 60)))
        axes = (int(rng.integers(30, 120)), int(rng.integers(30, 100)))
        cv2.ellipse(label, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(key), -1)
        cv2.ellipse(image, centre, axes, 0, 0, 360, rng.integers(0, 256, 3).tolist(), -1)
    noise = rng.normal(0, 8, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, label, keys.astype(np.int64)


def cam_arrays(label: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
    """make_cams' arrays: the objects' masks blurred at stride 4, max-normalised."""
    h, w = label.shape
    grid = (w // 4, h // 4)
    cams = []
    for key in keys:
        small = cv2.resize((label == key).astype(np.float32), grid, interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), 3)
        cams.append(small / max(float(small.max()), 1e-5))
    cam = np.stack(cams)
    high_res = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in cam])
    return {"keys": keys, "cam": cam.astype(np.float16), "high_res": high_res.astype(np.float16)}


def logits(label: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """Segmenter-like logits at stride 8: a blurred one-hot of the label map plus noise."""
    rng = np.random.default_rng(seed)
    h, w = label.shape
    grid = ((w + 7) // 8, (h + 7) // 8)
    out = rng.normal(0, 1, (classes, grid[1], grid[0])).astype(np.float32)
    for c in np.unique(label):
        plane = cv2.resize((label == c).astype(np.float32), grid, interpolation=cv2.INTER_AREA)
        out[c] += 8 * cv2.GaussianBlur(plane, (0, 0), 1)
    return out


def npz_size(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of an uncompressed .npz of these arrays (the float16 stores, as written before)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


def write_inputs(folder: Path, images: int, classes: int, cfg: DictConfig) -> list[dict]:
    """The files the CPU stages read, for `images` scenes; returns per image its paths and the
    bytes the float16 stores would have written."""
    encode_cam = cam_encoder("uint8")
    inference = cfg.segmenter.inference
    items = []
    for seed in range(images):
        image, label, keys = scene(seed, classes)
        item = {
            "id": f"img_{seed:04d}",
            "image": folder / f"img_{seed:04d}.jpg",
            "label": label,
            "cams": folder / "cams",
            "logits": folder / "logits" / f"img_{seed:04d}.npz",
            "mask": folder / "masks" / f"img_{seed:04d}.png",
        }
        for sub in ("cams", "logits", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(item["image"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cams = cam_arrays(label, keys)
        atomic_save_npz(item["cams"] / f"{item['id']}.npz", True, **encode_cam(cams))
        values = logits(label, classes, seed)
        store = encode_logits(values, inference.logits_dtype, inference.logits_min_prob)
        atomic_save_npz(item["logits"], True, **store)
        item["float16 bytes"] = {
            "cams": npz_size(cams),
            "logits": npz_size({"logits": values.astype(np.float16)}),
        }
        save_label_png(item["mask"], label)
        items.append(item)
    return items


# -- timing -------------------------------------------------------------------------------------
def seconds_per_image(fn: Callable[[dict], None], items: list[dict], workers: int = 1) -> float:
    """Wall seconds per image over the items (a pool of `workers`: its start-up included)."""
    start = time.perf_counter()
    run_parallel(fn, items, workers, start_method="fork")
    return (time.perf_counter() - start) / len(items)


def _ir(item: dict, *, job: Callable) -> None:
    job((item["id"], str(item["image"]), item["cams"]))


def _crf(item: dict, *, job: Callable) -> None:
    job((item["id"], str(item["image"]), item["logits"]))


def _eval_cam(item: dict, *, sweep: ThresholdSweep) -> None:
    cam = load_cam(item["cams"], item["id"])
    sweep.update(cam["high_res"], cam["keys"], item["label"])


def _eval_png(item: dict, *, metric: SegmentationMetric) -> None:
    metric.update(read_label_png(item["mask"]), item["label"])


def folder_bytes(folder: Path, pattern: str) -> float:
    files = list(folder.glob(pattern))
    return sum(f.stat().st_size for f in files) / max(1, len(files))


def measure(name: str, classes: int, cfg: DictConfig, seam: DictConfig, args, tmp: Path) -> dict:
    """Seconds per image (one process) of each CPU stage, and bytes per image written."""
    items = write_inputs(tmp / name, args.images, classes, cfg)
    ir, psa, seg = tmp / name / "ir", tmp / name / "psa", tmp / name / "crf"
    for d in (ir, psa, seg):
        d.mkdir()
    ir_opts, psa_opts = cfg.affinity.ir_label, seam.affinity.psa_label
    ir_job = partial(
        _ir_label_job,
        fg=ir_opts.fg_threshold,
        bg=ir_opts.bg_threshold,
        crf=CRFParams.from_config(ir_opts.crf, "affinity.ir_label.crf"),
        out_dir=ir,
    )
    psa_job = partial(
        _psa_label_job,
        low_alpha=psa_opts.low_alpha,
        high_alpha=psa_opts.high_alpha,
        crf=CRFParams.from_config(psa_opts.crf, "affinity.psa_label.crf"),
        out_dir=psa,
    )
    crf = CRFParams.from_config(OmegaConf.to_container(cfg.segmenter.crf, resolve=True), "crf")
    crf_job = partial(_crf_job, params=crf, out_dir=seg, num_classes=classes)
    sweep = ThresholdSweep(
        [float(t) for t in cfg.cam.eval.sweep],
        num_classes=classes,
        configured_threshold=cfg.cam.eval.bg_threshold,
    )
    rates = {
        "make_ir_labels": seconds_per_image(partial(_ir, job=ir_job), items),
        "make_psa_labels": seconds_per_image(partial(_ir, job=psa_job), items),
        "crf_segmenter": seconds_per_image(partial(_crf, job=crf_job), items),
        "eval_cams": seconds_per_image(partial(_eval_cam, sweep=sweep), items),
        "eval_png": seconds_per_image(
            partial(_eval_png, metric=SegmentationMetric(classes)), items
        ),
    }
    if args.pool > 1:
        rates["crf_segmenter, 2-process pool"] = seconds_per_image(
            partial(_crf, job=crf_job), items, workers=args.pool
        )
    written = {
        "CAM file (uint8 store)": folder_bytes(tmp / name / "cams", "*.npz"),
        "CAM file (float16, before)": np.mean([i["float16 bytes"]["cams"] for i in items]),
        "val logits (uint8 store)": folder_bytes(tmp / name / "logits", "*.npz"),
        "val logits (float16, before)": np.mean([i["float16 bytes"]["logits"] for i in items]),
        "label PNG": folder_bytes(ir, "*.png"),
    }
    return {"rates": rates, "bytes": written}


# -- projection ---------------------------------------------------------------------------------
def stage_images(data: str, cfg: DictConfig) -> dict[str, tuple[int, str]]:
    """Images per round of each CPU stage of the IRNet + CONTA pipeline, and who runs them."""
    n = SETS[data]
    crf_images = len(crf_subset(n["val"], cfg.segmenter.get("crf_images")))
    return {
        "make_ir_labels": (n["train"], "pool"),
        "eval_cams": (n["eval"], "ranks"),
        "eval_pseudo": (2 * n["eval"], "ranks"),  # the IR labels and the pseudo-masks
        "eval_segmenter": (n["val"], "ranks"),
        "crf_segmenter": (crf_images, "pool"),
        "crf_segmenter scoring": (crf_images, "ranks"),
    }


def project(data: str, cfg: DictConfig, rates: dict, node_processes: int, gpus: int) -> dict:
    """Hours per stage over the ROUNDS rounds on one node of `gpus` GPUs."""
    per_image = {
        "make_ir_labels": rates["make_ir_labels"],
        "eval_cams": rates["eval_cams"],
        "eval_pseudo": rates["eval_png"],
        "eval_segmenter": rates["eval_png"],
        "crf_segmenter": rates["crf_segmenter"],
        "crf_segmenter scoring": rates["eval_png"],
    }
    images = stage_images(data, cfg)
    processes = {
        s: max(gpus, node_processes) if who == "pool" else gpus for s, (_, who) in images.items()
    }
    units = {stage: n for stage, (n, _) in images.items()}
    return projected_hours(units, lambda _round, stage: per_image[stage], ROUNDS, processes)


def gpu_stage_images(data: str, cfg: DictConfig) -> dict[str, int]:
    """Images per round through each GPU stage of the IRNet + CONTA pipeline."""
    n, seg = SETS[data], cfg.segmenter
    return {
        "train_cam": cfg.cam.max_epochs * n["train"],
        "make_cams": n["train"],
        "train_affinity": cfg.affinity.max_epochs * n["train"],
        "make_pseudo_masks": n["train"],
        "train_segmenter": seg.max_steps * seg.batch_size * seg.accumulate_grad_batches,
        "predict_segmenter": n["val"],
        "confounders": n["train"] + n["val"],
    }


def project_gpu(data: str, cfg: DictConfig, rates: dict, precision: str, gpus: int) -> dict:
    """Hours per GPU stage over the ROUNDS rounds on `gpus` GPUs, from one GPU's rates: round 0
    at the plain classifier's, rounds 1.. at the CONTA classifier's (context module and m)."""
    conta_of = {base: conta for conta, base in gpu_stages.CONTA_STAGES.items()}

    def seconds_per_image(round_idx: int, stage: str) -> float:
        timed = conta_of.get(stage, stage) if round_idx > 0 else stage
        return 1 / rates[timed, precision, gpus].images_per_s

    return projected_hours(gpu_stage_images(data, cfg), seconds_per_image, ROUNDS, gpus)


def print_gpu_projection(cfgs: dict, measured: dict, gpu_rates: dict, args) -> None:
    processes = max(args.node_processes)
    print(
        f"\nprojected hours for T = 3 ({ROUNDS} rounds), GPU stages + CPU stages at "
        f"{processes} CRF processes/node (COCO with VOC-shaped GPU rates)"
    )
    for data, cfg in cfgs.items():
        for precision in args.precision:
            for gpus in (1, 8):
                gpu = project_gpu(data, cfg, gpu_rates, precision, gpus)
                cpu = sum(project(data, cfg, measured[data]["rates"], processes, gpus).values())
                parts = ", ".join(f"{k} {v:.2f}" for k, v in gpu.items())
                print(
                    f"  {data}_conta, {precision:10s} {gpus} GPU(s): "
                    f"{sum(gpu.values()) + cpu:7.2f} h = GPU {sum(gpu.values()):.2f} "
                    f"({parts}) + CPU {cpu:.2f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="VOC-sized images per data set")
    parser.add_argument("--pool", type=int, default=2, help="also time the CRF on this pool")
    parser.add_argument(
        "--node-processes",
        type=int,
        nargs="+",
        default=[8, 64],
        help="CRF processes per node to project for (the paper configs: 8)",
    )
    parser.add_argument(
        "--device", default=None, help="also time the GPU stages on this device (cuda, cpu)"
    )
    parser.add_argument("--precision", nargs="+", default=list(gpu_stages.PRECISIONS))
    parser.add_argument("--steps", type=int, default=10, help="timed batches per GPU stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before them")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process = one core, as in a pool
    cfgs = {
        "voc": gpu_stages.compose_experiment("voc_conta"),
        "coco": gpu_stages.compose_experiment("coco_conta"),
    }
    seam = gpu_stages.compose_experiment("voc", ["method=seam", "conta=off"])
    print(
        f"CPU stages at 500x375, {args.images} images per set, 1 process (cpus: {os.cpu_count()})"
    )
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data, classes in (("voc", 21), ("coco", 81)):
            measured[data] = measure(data, classes, cfgs[data], seam, args, Path(tmp))
    print("\nseconds per image (images/s) in one process")
    for data, m in measured.items():
        for stage, s in m["rates"].items():
            print(f"  {data:4s} {stage:32s} {s:8.3f} s  ({1 / s:7.2f} images/s)")
    print("\nbytes per VOC-sized image")
    for data, m in measured.items():
        for what, b in m["bytes"].items():
            print(f"  {data:4s} {what:36s} {b:12,.0f}")
        for what in ("CAM file", "val logits"):
            ratio = m["bytes"][f"{what} (uint8 store)"] / m["bytes"][f"{what} (float16, before)"]
            print(f"  {data:4s} {what + ' uint8 / float16':36s} {ratio:12.3f}")
    print(f"\nprojected CPU-stage hours for T = 3 ({ROUNDS} rounds), IRNet + CONTA")
    for data, cfg in cfgs.items():
        subset = cfg.segmenter.get("crf_images")
        print(f"  {data}_conta (segmenter.crf_images={subset}):")
        for processes in args.node_processes:
            for gpus in (1, 8):
                hours = project(data, cfg, measured[data]["rates"], processes, gpus)
                parts = ", ".join(f"{k} {v:.2f}" for k, v in hours.items())
                print(
                    f"    {gpus} GPU(s), {processes:3d} CRF processes/node: "
                    f"{sum(hours.values()):7.2f} h  ({parts})"
                )
    if args.device is None:
        print("\nGPU stages: not timed (--device cuda times them and adds them to the projection)")
        return
    print(f"\nGPU stages of voc_conta on {args.device}, images {SIZE[1]}x{SIZE[0]}, one GPU")
    torch.set_num_threads(threads)  # a GPU stage's process has the default threads
    gpu_cfg = gpu_stages.compose_experiment("voc_conta")
    gpu_rates = gpu_stages.measure(
        gpu_cfg, args.device, args.precision, [1, 8], args.steps, args.warmup
    )
    gpu_stages.print_rates(gpu_rates)
    print_gpu_projection(cfgs, measured, gpu_rates, args)


if __name__ == "__main__":
    main()
