"""The synthetic set: layout, determinism, the context bias and the co-occurring pair."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from src.datamodules.coco import COCOSegmentation
from src.datamodules.palette import VOC_PALETTE, read_label_png
from src.datamodules.synthetic import (
    COCO_CATEGORY_IDS,
    HOME_CONTEXT,
    PAIR,
    SYNTH_CLASSES,
    SYNTH_CONTEXTS,
    ensure_synthetic_voc,
)
from src.datamodules.validation import DatasetError
from src.datamodules.voc import VOCSegmentation

from .conftest import TINY

SMALL = {"num_train": 6, "num_val": 2, "image_size": 48}


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def test_layout(synth_root: Path):
    assert len(SYNTH_CLASSES) >= 7 and SYNTH_CLASSES[0] == "background"
    assert len(SYNTH_CONTEXTS) == len(SYNTH_CLASSES) - 1
    train, val = _ids(synth_root, "train"), _ids(synth_root, "val")
    assert (len(train), len(val)) == (TINY["num_train"], TINY["num_val"])
    for image_id in train + val:
        for folder, ext in (
            ("JPEGImages", "jpg"),
            ("SegmentationClass", "png"),
            ("ContextRegions", "png"),
        ):
            assert (synth_root / folder / f"{image_id}.{ext}").is_file()
    meta = json.loads((synth_root / "meta.json").read_text())
    assert meta["generator"]["num_train"] == TINY["num_train"]
    assert meta["classes"] == list(SYNTH_CLASSES) and meta["contexts"] == list(SYNTH_CONTEXTS)
    coco = json.loads((synth_root / "annotations" / "instances_train.json").read_text())
    ids = [c["id"] for c in coco["categories"]]
    assert ids == list(COCO_CATEGORY_IDS) and ids != list(range(1, len(ids) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in coco["annotations"])


def test_deterministic_and_seeded(tmp_path: Path):
    a = ensure_synthetic_voc(tmp_path / "a", **SMALL)
    b = ensure_synthetic_voc(tmp_path / "b", **SMALL)
    c = ensure_synthetic_voc(tmp_path / "c", **SMALL, seed=1)
    bytes_a = _all_bytes(a)
    assert bytes_a == _all_bytes(b)
    bytes_c = _all_bytes(c)
    assert bytes_c.keys() == bytes_a.keys()
    assert bytes_c["JPEGImages/train_00000.jpg"] != bytes_a["JPEGImages/train_00000.jpg"]


def test_regenerates_on_new_args_or_missing_file(tmp_path: Path):
    root = ensure_synthetic_voc(tmp_path / "s", **SMALL)
    meta = root / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert ensure_synthetic_voc(root, **SMALL) == root and meta.stat().st_mtime_ns == stamp
    ensure_synthetic_voc(root, **{**SMALL, "num_train": 4})  # args differ: regenerated
    assert len(_ids(root, "train")) == 4
    (root / "SegmentationClass" / "train_00001.png").unlink()  # incomplete: regenerated
    ensure_synthetic_voc(root, **{**SMALL, "num_train": 4})
    assert (root / "SegmentationClass" / "train_00001.png").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp folders are cleaned up


def test_never_overwrites_a_foreign_folder(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not a synthetic data set folder"):
        ensure_synthetic_voc(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_masks_are_voc_palette_pngs_with_void_borders(synth_root: Path):
    image_id = _ids(synth_root, "train")[0]
    with Image.open(synth_root / "SegmentationClass" / f"{image_id}.png") as img:
        assert img.mode == "P"
        palette = np.array(img.getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
    assert (palette == VOC_PALETTE).all()
    for image_id in _ids(synth_root, "train"):
        mask = read_label_png(synth_root / "SegmentationClass" / f"{image_id}.png")
        assert (mask == 255).any()
        assert set(np.unique(mask)) <= set(range(len(SYNTH_CLASSES))) | {255}
        # The band separates labels: no object pixel touches a pixel of another label directly.
        for k in np.unique(mask):
            if k in (0, 255):
                continue
            grown = cv2.dilate((mask == k).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            assert set(np.unique(mask[grown])) <= {int(k), 255}


@pytest.fixture(scope="module")
def biased_root(tmp_path_factory) -> Path:
    """Enough images to measure the realised bias (48 px keeps it quick)."""
    root = tmp_path_factory.mktemp("bias") / "synth"
    return ensure_synthetic_voc(root, num_train=240, num_val=240, image_size=48)


def _single_class_home_rate(root: Path, split: str) -> tuple[float, int]:
    """Among images showing one class only, the fraction whose home context is present."""
    hits = n = 0
    for image_id in _ids(root, split):
        mask = read_label_png(root / "SegmentationClass" / f"{image_id}.png")
        classes = [int(k) for k in np.unique(mask) if k not in (0, 255)]
        if len(classes) != 1:
            continue
        context = read_label_png(root / "ContextRegions" / f"{image_id}.png")
        n += 1
        hits += bool((context == classes[0]).any())
    return hits / n, n


def test_context_bias_is_present_in_train_only(biased_root: Path):
    train_rate, n_train = _single_class_home_rate(biased_root, "train")
    val_rate, n_val = _single_class_home_rate(biased_root, "val")
    assert n_train > 80 and n_val > 80
    assert abs(train_rate - 0.9) < 0.08, train_rate
    assert abs(val_rate - 0.5) < 0.15, val_rate
    meta = json.loads((biased_root / "meta.json").read_text())
    assert abs(meta["stats"]["train"]["home_context_rate"] - 0.9) < 0.06


def test_context_regions_are_large_and_around_the_object(biased_root: Path):
    fractions = []
    for image_id in _ids(biased_root, "train")[:60]:
        context = read_label_png(biased_root / "ContextRegions" / f"{image_id}.png")
        mask = read_label_png(biased_root / "SegmentationClass" / f"{image_id}.png")
        assert not ((context > 0) & (mask > 0) & (mask < 255)).any()  # background pixels only
        if context.any():
            fractions.append((context > 0).mean())
    assert np.median(fractions) > 0.25


def test_rider_stands_on_mount(biased_root: Path):
    mount, rider = SYNTH_CLASSES.index(PAIR["mount"]), SYNTH_CLASSES.index(PAIR["rider"])
    with_mount = with_both = touching = 0
    for image_id in _ids(biased_root, "train"):
        mask = read_label_png(biased_root / "SegmentationClass" / f"{image_id}.png")
        if not (mask == mount).any():
            continue
        with_mount += 1
        if (mask == rider).any():
            with_both += 1
            grown = cv2.dilate((mask == rider).astype(np.uint8), np.ones((7, 7), np.uint8))
            touching += bool((grown.astype(bool) & (mask == mount)).any())
    assert with_mount > 20
    assert abs(with_both / with_mount - 0.7) < 0.2
    assert touching >= 0.6 * with_both


def test_objects_are_large(biased_root: Path):
    coco = json.loads((biased_root / "annotations" / "instances_train.json").read_text())
    by_image: dict[int, list[int]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["area"])
    single = [areas[0] for areas in by_image.values() if len(areas) == 1]
    assert single and min(single) >= 0.095 * 48 * 48  # unoccluded objects: >= ~10% of the image
    assert all(1 <= len(a) <= 3 for a in by_image.values())


def test_home_contexts_are_one_per_class():
    assert sorted(HOME_CONTEXT) == sorted(SYNTH_CLASSES[1:])
    assert sorted(HOME_CONTEXT.values()) == sorted(SYNTH_CONTEXTS)


def test_coco_export_matches_voc_masks(synth_root: Path, tmp_path: Path):
    voc = VOCSegmentation(
        synth_root, "ImageSets/Segmentation/train.txt", "SegmentationClass", SYNTH_CLASSES
    )
    coco = COCOSegmentation(
        synth_root, "JPEGImages", "annotations/instances_train.json", cache_dir=tmp_path
    )
    assert coco.class_names == list(SYNTH_CLASSES)
    assert coco.ids == voc.ids
    np.testing.assert_array_equal(coco.labels, voc.labels)
    for i in range(len(voc)):
        a, b = coco.load_mask(i), voc.load_mask(i)
        known = b != 255
        np.testing.assert_array_equal(a[known], b[known])
