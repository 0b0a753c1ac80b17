"""Segmenter logits kept for the CRF (src/postprocess/logits_store.py): float16 of every class
(before), float16 of the plausible classes, uint8 log-probabilities of the plausible classes.
Prints, never asserts.

Reads a finished run's val logits (predict_segmenter), stores them each way and reports the bytes
per image, the classes kept, and the CRF mIoU from each (crf_segmenter's CRF and scoring).

The comparison is against the files as stored: for the loss against the computed logits, pass a
run made with segmenter.inference.logits_dtype=float16 segmenter.inference.logits_min_prob=0.

    python bench/logits_store.py [--run outputs/synth_irnet_conta/seed_0] [--round 0] [--min-prob 1e-4]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.datamodules import build_dataset  # noqa: E402
from src.datamodules.validation import read_rgb  # noqa: E402
from src.evaluation.metrics import SegmentationMetric  # noqa: E402
from src.pipeline.stages.segmenter import LOGITS_DIR, read_logits  # noqa: E402
from src.postprocess.crf import CRFParams, crf_refine_logits  # noqa: E402
from src.postprocess.logits_store import decode_logits, encode_logits  # noqa: E402


def npz_bytes(arrays: dict, compress: bool) -> int:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getbuffer().nbytes


def fail(message: str) -> None:
    raise ValueError(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "outputs/synth_irnet_conta/seed_0")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--min-prob", type=float, default=1e-4)
    args = parser.parse_args()
    if not (args.run / "config.yaml").is_file():
        raise SystemExit(f"{args.run} holds no finished run: run `make train` first, or pass --run")
    cfg = OmegaConf.load(args.run / "config.yaml")
    params = CRFParams.from_config(OmegaConf.to_container(cfg.segmenter.crf), "segmenter.crf")
    folder = args.run / f"round_{args.round}" / "predict_segmenter" / LOGITS_DIR
    dataset = build_dataset(cfg.data, cfg.data.val_split)
    c = cfg.data.num_classes
    stores = {"float16, all": ("float16", 0.0), "float16": ("float16", args.min_prob)}
    stores["uint8"] = ("uint8", args.min_prob)
    metrics = {k: SegmentationMetric(c, sync_on_compute=False) for k in stores}
    size = dict.fromkeys(stores, 0)
    kept = dict.fromkeys(stores, 0)
    for i, image_id in enumerate(dataset.ids):
        logits, classes = read_logits(folder / f"{image_id}.npz", c)
        full = np.full((c, *logits.shape[1:]), -1e4, np.float32)  # classes not in the file
        full[classes] = logits
        image, mask = read_rgb(dataset.image_paths[i]), dataset.load_mask(i)
        for name, (dtype, min_prob) in stores.items():
            arrays = encode_logits(full, dtype, min_prob)
            size[name] += npz_bytes(arrays, compress=dtype == "uint8")
            values, ids = decode_logits(arrays, c, fail)
            kept[name] += len(ids)
            pred = ids[crf_refine_logits(image, torch.from_numpy(values), params)]
            metrics[name].update(pred, mask)
    n = len(dataset)
    miou = {k: 100 * m.compute()["miou"] for k, m in metrics.items()}
    print(f"{n} {cfg.data.val_split} images of {folder}, {c} classes, min_prob {args.min_prob}")
    ref = "float16, all"
    for k in stores:
        print(
            f"{k:<13} {size[k] / n:>9.0f} bytes/img ({size[k] / size[ref]:.3f})  "
            f"classes {kept[k] / n:.2f}  CRF mIoU {miou[k]:.3f} ({miou[k] - miou[ref]:+.3f})"
        )


if __name__ == "__main__":
    main()
