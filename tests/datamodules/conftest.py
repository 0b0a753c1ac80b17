"""Fixtures for the data layer: one tiny synthetic set per session, hand-built VOC trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from src.datamodules.palette import save_label_png
from src.datamodules.synthetic import SYNTH_CLASSES, ensure_synthetic_voc

TINY = {"num_train": 24, "num_val": 8, "image_size": 64}
TOY_CLASSES = ["background", "cat", "dog", "horse"]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return ensure_synthetic_voc(tmp_path_factory.mktemp("synth") / "synth", **TINY)


@pytest.fixture
def synth_cfg(synth_root: Path, tmp_path: Path) -> DictConfig:
    """A data config like conf/data/synth.yaml pointed at the session's tiny set."""
    split = "ImageSets/Segmentation/{}.txt"
    return OmegaConf.create(
        {
            "name": "synth",
            "format": "voc",
            "root": str(synth_root),
            "cache_dir": str(tmp_path / "cache"),
            "num_classes": len(SYNTH_CLASSES),
            "class_names": list(SYNTH_CLASSES),
            "on_empty_label": "error",
            "generator": dict(TINY),
            "splits": {
                s: {
                    "list": split.format(s),
                    "masks": "SegmentationClass",
                    "context": "ContextRegions",
                }
                for s in ("train", "val")
            },
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        }
    )


def write_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def toy_sample(rng: np.random.Generator, h: int, w: int, classes: list[int]):
    """An RGB image and a mask with one rectangle per class id (0 in ``classes`` = none)."""
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for j, c in enumerate(classes):
        mask[2 + 3 * j : h // 2 + 3 * j, 2 + 5 * j : w // 2 + 5 * j] = c
    if classes:
        mask[0, :] = 255  # a void row, as VOC has
    return image, mask


@pytest.fixture
def make_voc(tmp_path: Path) -> Callable[..., Path]:
    """Build a tiny VOC tree: ``make_voc(samples={id: [class ids]}, aug=False, ...)``.

    ``aug=True`` writes the SBD-augmented layout (grayscale SegmentationClassAug +
    ImageSets/SegmentationAug/train_aug.txt) with the list in deeplab-pytorch pair format.
    """

    def make(
        samples: dict[str, list[int]] | None = None,
        *,
        aug: bool = False,
        size: tuple[int, int] = (24, 32),
        root: Path | None = None,
    ) -> Path:
        root = root or tmp_path / "VOC2012"
        samples = samples if samples is not None else {"a1": [1], "a2": [2, 3], "a3": [3]}
        rng = np.random.default_rng(0)
        mask_dir = root / ("SegmentationClassAug" if aug else "SegmentationClass")
        mask_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for image_id, classes in samples.items():
            image, mask = toy_sample(rng, *size, classes)
            write_jpg(root / "JPEGImages" / f"{image_id}.jpg", image)
            if aug:  # SBD masks are plain grayscale PNGs of class ids
                Image.fromarray(mask).save(mask_dir / f"{image_id}.png")
                lines.append(f"/JPEGImages/{image_id}.jpg /SegmentationClassAug/{image_id}.png")
            else:
                save_label_png(mask_dir / f"{image_id}.png", mask)
                lines.append(image_id)
        list_dir = root / "ImageSets" / ("SegmentationAug" if aug else "Segmentation")
        list_dir.mkdir(parents=True, exist_ok=True)
        (list_dir / ("train_aug.txt" if aug else "train.txt")).write_text("\n".join(lines) + "\n")
        return root

    return make
