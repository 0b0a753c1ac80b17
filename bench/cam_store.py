"""CAM file size and score by storage (`cam.inference.store`): float16 as computed vs uint8 (bins
of 1/200 on the 0.005 grid, zlib-compressed; src/pipeline/stages/cam.py). Prints, never asserts.

Reads the CAM files of a finished run (any store), then for every training image encodes the
maps both ways and reports:

* bytes per image at the run's own size, and "VOC-sized": each map resized bilinearly to
  500 x 375 (high_res) and its stride-4 grid (125 x 94), as make_cams would write for a VOC image
  with the same classes (the compressed size depends on how smooth the maps are; CAMs are
  upsampled from stride 4, so resizing keeps their smoothness);
* CAM mIoU on the run's eval split at the configured threshold and at the best one of the
  sweep, from each store's decoded maps (same threshold sweep as eval_cams).

The comparison is against the files as stored: for the loss of uint8 against the computed maps,
pass a run made with cam.inference.store=float16 (the default is uint8).

    python bench/cam_store.py [--run outputs/synth_irnet_conta/seed_0] [--round 0]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import cv2
import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.datamodules import build_dataset  # noqa: E402
from src.evaluation.cam import ThresholdSweep  # noqa: E402
from src.pipeline.stages.cam import CAM_DIR, CAM_STORES, cam_encoder, decode_cam, load_cam  # noqa: E402, I001

VOC_SIZE = (375, 500)  # (H, W) of a typical VOC image
STORES = CAM_STORES


def npz_bytes(arrays: dict, compress: bool) -> int:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getbuffer().nbytes


def stored(arrays: dict, store: str) -> tuple[dict, int]:
    """The arrays as make_cams writes them with `store`, and the file's bytes."""
    encoded = cam_encoder(store)(arrays)
    return encoded, npz_bytes(encoded, compress=store == "uint8")


def voc_sized(cam: dict) -> dict:
    def resize(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        planes = [cv2.resize(m, hw[::-1], interpolation=cv2.INTER_LINEAR) for m in maps]
        return np.stack(planes) if planes else np.zeros((0, *hw), np.float32)

    stride4 = (-(-VOC_SIZE[0] // 4), -(-VOC_SIZE[1] // 4))
    return {
        "keys": cam["keys"],
        "cam": resize(cam["cam"], stride4),
        "high_res": resize(cam["high_res"], VOC_SIZE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "outputs/synth_irnet_conta/seed_0")
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args()
    if not (args.run / "config.yaml").is_file():
        raise SystemExit(f"{args.run} holds no finished run: run `make train` first, or pass --run")
    cfg = OmegaConf.load(args.run / "config.yaml")
    cam_dir = args.run / f"round_{args.round}" / "make_cams" / CAM_DIR
    dataset = build_dataset(cfg.data, cfg.data.eval_split)
    sweeps = {
        store: ThresholdSweep(
            [float(t) for t in cfg.cam.eval.sweep],
            num_classes=cfg.data.num_classes,
            configured_threshold=cfg.cam.eval.bg_threshold,
        )
        for store in STORES
    }
    native = {s: 0 for s in STORES}
    voc = {s: 0 for s in STORES}
    for i, image_id in enumerate(dataset.ids):
        cam = load_cam(cam_dir, image_id)
        mask = dataset.load_mask(i)
        for store in STORES:
            encoded, size = stored(cam, store)
            native[store] += size
            voc[store] += stored(voc_sized(cam), store)[1]
            maps = decode_cam(encoded)
            sweeps[store].update(maps["high_res"], maps["keys"], mask)
    n = len(dataset)
    scores = {s: sweeps[s].compute() for s in STORES}
    print(f"{n} images of {cam_dir} ({cfg.data.name}, eval split {cfg.data.eval_split!r})")
    print(f"{'store':<9} {'bytes/img':>10} {'VOC-sized':>10} {'mIoU@cfg':>9} {'best':>7}")
    for s in STORES:
        at, best = scores[s]["at_configured"]["miou"], scores[s]["best_miou"]
        print(
            f"{s:<9} {native[s] / n:>10.0f} {voc[s] / n:>10.0f} {100 * at:>9.3f} {100 * best:>7.3f}"
        )
    ref = scores["float16"]
    for s in STORES[:-1]:
        print(
            f"{s}/float16 bytes: {native[s] / native['float16']:.3f} (run's size), "
            f"{voc[s] / voc['float16']:.3f} (VOC-sized); mIoU {s} - float16: "
            f"{100 * (scores[s]['at_configured']['miou'] - ref['at_configured']['miou']):+.3f} "
            f"at {cfg.cam.eval.bg_threshold}, "
            f"{100 * (scores[s]['best_miou'] - ref['best_miou']):+.3f} at the best"
        )


if __name__ == "__main__":
    main()
