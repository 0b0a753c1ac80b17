"""Stand-in data sets in the real VOC 2012 and COCO 2014 layouts, for runs without the data.

The paper recipes read folders whose layout, list formats, image sizes and class counts are
fixed by the data sets; `make preflight` and its tests run them on these folders. Images are
VOC-sized (500 x 375 landscape, 375 x 500 portrait, alternating), each with one to three
coloured ellipses of random classes on a noisy background; what matters is that every file is
where and as the readers expect it, not what the pictures show.

* VOC (`write_voc`): `JPEGImages/`, `SegmentationClass/` (palette PNGs, a 255 void rim around
  each object), `SegmentationClassAug/` (grayscale id PNGs, as SBD's), the lists
  `ImageSets/Segmentation/{train,val}.txt` (bare ids) and `ImageSets/SegmentationAug/
  train_aug.txt` (deeplab-pytorch's `/JPEGImages/x.jpg /SegmentationClassAug/x.png` pairs);
  train_aug holds train, as the real one does. 21 classes.
* COCO (`write_coco`): `train2014/`, `val2014/` (`COCO_<split>2014_<12 digits>.jpg`) and
  `annotations/instances_{train,val}2014.json` with COCO's 80 category ids (1..90 with gaps)
  and polygon segmentations. 81 classes with background.

    python -m src.datamodules.layouts voc /tmp/VOC2012 [--train-aug 8 --train 4 --val 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from src.datamodules.palette import IGNORE_INDEX, save_label_png
from src.utils.io import atomic_write_bytes, atomic_write_text

SIZES = ((375, 500), (500, 375))  # (H, W): VOC's commonest landscape and portrait sizes
VOC_CLASSES = 21
# COCO's 80 category ids: 1..90 without the 10 ids the 2014 release left unused.
COCO_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def scene(seed: int, index: int, num_classes: int) -> tuple[np.ndarray, list[tuple[int, list]]]:
    """An RGB image and its objects as (class id 1..num_classes-1, polygon [x0, y0, x1, ...])."""
    rng = np.random.default_rng([seed, index])
    h, w = SIZES[index % 2]
    image = rng.integers(40, 200, (h, w, 3), dtype=np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.1, 0.25) * h, rng.uniform(0.1, 0.25) * w
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        polygon = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.fillPoly(image, [np.round(polygon).astype(np.int32)], colour)
        objects.append((cls, polygon.round(1).reshape(-1).tolist()))
    return image, objects


def _mask(shape: tuple[int, int], objects: list[tuple[int, list]], rim: bool) -> np.ndarray:
    """Class ids painted in order (later objects on top); VOC's 255 rim where `rim`."""
    mask = np.zeros(shape, np.uint8)
    for cls, flat in objects:
        points = np.round(np.asarray(flat).reshape(-1, 2)).astype(np.int32)
        if rim:
            cv2.polylines(mask, [points], True, IGNORE_INDEX, thickness=3)
        cv2.fillPoly(mask, [points], cls)
    return mask


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def write_voc(root: Path, train_aug: int = 8, train: int = 4, val: int = 4, seed: int = 0) -> Path:
    """A VOC 2012 + SBD folder (see the module docstring); train is the first `train` of
    train_aug. Returns `root`."""
    if not 0 < train <= train_aug or val < 1:
        raise ValueError(f"need 0 < train <= train_aug and val >= 1, got {train}/{train_aug}/{val}")
    root = Path(root)
    ids = {"train_aug": [f"2007_{i:06d}" for i in range(train_aug)]}
    ids["train"] = ids["train_aug"][:train]
    ids["val"] = [f"2008_{i:06d}" for i in range(val)]
    for index, image_id in enumerate(ids["train_aug"] + ids["val"]):
        image, objects = scene(seed, index, VOC_CLASSES)
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
        mask = _mask(image.shape[:2], objects, rim=True)
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        aug = root / "SegmentationClassAug" / f"{image_id}.png"
        aug.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_mask(image.shape[:2], objects, rim=False)).save(aug)
    lists = root / "ImageSets"
    pairs = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids["train_aug"]]
    atomic_write_text(lists / "SegmentationAug" / "train_aug.txt", "\n".join(pairs) + "\n")
    for split in ("train", "val"):
        atomic_write_text(lists / "Segmentation" / f"{split}.txt", "\n".join(ids[split]) + "\n")
    return root


def write_coco(root: Path, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """A COCO 2014 folder (see the module docstring). Returns `root`."""
    root = Path(root)
    categories = [{"id": cid, "name": f"class_{cid}", "supercategory": "x"} for cid in COCO_IDS]
    offset = 0
    for split, count in (("train", train), ("val", val)):
        images, annotations = [], []
        for k in range(count):
            image, objects = scene(seed, offset + k, len(COCO_IDS) + 1)
            image_id = offset + k + 1
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            _save_jpeg(root / f"{split}2014" / name, image)
            h, w = image.shape[:2]
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for cls, flat in objects:
                xs, ys = flat[0::2], flat[1::2]
                annotations.append(
                    {
                        "id": len(annotations) + 1 + 100_000 * (split == "val"),
                        "image_id": image_id,
                        "category_id": COCO_IDS[cls - 1],
                        "segmentation": [flat],
                        "area": float(cv2.contourArea(np.float32(np.stack([xs, ys], 1)))),
                        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                        "iscrowd": 0,
                    }
                )
        offset += count
        payload = {"images": images, "annotations": annotations, "categories": categories}
        path = root / "annotations" / f"instances_{split}2014.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(payload).encode())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=("voc", "coco"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--train-aug", type=int, default=8, help="VOC: train_aug images")
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.layout == "voc":
        write_voc(args.root, args.train_aug, args.train, args.val, args.seed)
    else:
        write_coco(args.root, args.train, args.val, args.seed)
    print(f"wrote a {args.layout} layout under {args.root}")


if __name__ == "__main__":
    main()
