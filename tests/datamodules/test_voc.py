"""VOC reader: the synthetic set, the SBD-augmented layout, label caching, extras."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from src.datamodules.palette import read_label_png
from src.datamodules.synthetic import SYNTH_CLASSES, SYNTH_CONTEXTS
from src.datamodules.voc import VOCSegmentation, labels_from_mask, parse_id_list

from .conftest import TINY, TOY_CLASSES


def _synth(root: Path, split: str = "train", **kwargs) -> VOCSegmentation:
    return VOCSegmentation(
        root,
        f"ImageSets/Segmentation/{split}.txt",
        "SegmentationClass",
        SYNTH_CLASSES,
        context_dir="ContextRegions",
        **kwargs,
    )


def test_reads_the_synthetic_set(synth_root: Path):
    ds = _synth(synth_root)
    assert len(ds) == TINY["num_train"] and ds.num_classes == len(SYNTH_CLASSES)
    assert ds.context_names == ["none", *SYNTH_CONTEXTS]
    sample = ds[3]
    size = TINY["image_size"]
    assert sample["id"] == ds.ids[3] and sample["index"] == 3
    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0  # no transform: [0, 1]
    assert sample["mask"].shape == (size, size) and sample["mask"].dtype == torch.long
    assert sample["context"].shape == (size, size) and sample["context"].dtype == torch.long
    assert sample["size"].tolist() == [size, size]
    assert sample["label"].dtype == torch.float32 and sample["label"].shape == (
        len(SYNTH_CLASSES) - 1,
    )
    mask = read_label_png(synth_root / "SegmentationClass" / f"{ds.ids[3]}.png")
    np.testing.assert_array_equal(sample["mask"].numpy(), mask)
    np.testing.assert_array_equal(ds.labels[3], labels_from_mask(mask, ds.num_classes))
    assert (ds.labels.sum(axis=1) >= 1).all()


def test_labels_ignore_void_pixels():
    mask = np.array([[0, 2, 255], [255, 2, 0]], np.uint8)
    assert labels_from_mask(mask, 4).tolist() == [0.0, 1.0, 0.0]


def test_labels_are_cached_and_rebuilt_when_a_mask_changes(synth_root: Path, tmp_path: Path):
    root = Path(shutil.copytree(synth_root, tmp_path / "synth"))  # this test touches files
    cache = tmp_path / "cache"
    first = _synth(root, cache_dir=cache)
    assert first.mask_reads == len(first)
    assert len(list(cache.glob("labels_train_*.npz"))) == 1
    second = _synth(root, cache_dir=cache)
    assert second.mask_reads == 0  # labels and validation come from the cache
    np.testing.assert_array_equal(second.labels, first.labels)

    # Another list (other ids) gets its own cache entry.
    _synth(root, "val", cache_dir=cache)
    assert len(list(cache.glob("labels_*.npz"))) == 2

    # A rewritten mask (new mtime) invalidates the cache: no stale labels.
    mask_path = root / "SegmentationClass" / f"{first.ids[0]}.png"
    st = mask_path.stat()
    os.utime(mask_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = _synth(root, cache_dir=cache)
    assert third.mask_reads == len(third)


def test_unvalidated_cache_is_not_trusted_for_validation(synth_root: Path, tmp_path: Path):
    _synth(synth_root, cache_dir=tmp_path, validate=False)
    assert _synth(synth_root, cache_dir=tmp_path, validate=False).mask_reads == 0
    assert _synth(synth_root, cache_dir=tmp_path, validate=True).mask_reads > 0


def test_train_aug_layout_in_both_list_formats(make_voc):
    samples = {"2007_000032": [1], "2008_000002": [2, 3], "2011_003276": [3]}
    root = make_voc(samples, aug=True)
    pairs = root / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    assert pairs.read_text().startswith("/JPEGImages/2007_000032.jpg /SegmentationClassAug/")
    bare = pairs.with_name("train_aug_bare.txt")
    bare.write_text("\n".join(samples) + "\n")
    assert parse_id_list(pairs) == parse_id_list(bare) == list(samples)

    a = VOCSegmentation(
        root, "ImageSets/SegmentationAug/train_aug.txt", "SegmentationClassAug", TOY_CLASSES
    )
    b = VOCSegmentation(
        root, "ImageSets/SegmentationAug/train_aug_bare.txt", "SegmentationClassAug", TOY_CLASSES
    )
    assert a.ids == b.ids == list(samples)
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert a.labels.tolist() == b.labels.tolist() == expected
    assert a[1]["mask"].max().item() == 255 and set(a[1]["mask"].unique().tolist()) == {
        0,
        2,
        3,
        255,
    }


def test_extra_targets_are_loaded_at_image_size(make_voc):
    root = make_voc()
    seen = []

    def context_map(image_id: str, hw: tuple[int, int]) -> np.ndarray:
        seen.append((image_id, hw))
        return np.full(hw, 0.5, np.float32)

    ds = VOCSegmentation(
        root,
        "ImageSets/Segmentation/train.txt",
        "SegmentationClass",
        TOY_CLASSES,
        extras={"context_map": context_map},
    )
    sample = ds[0]
    assert seen == [("a1", (24, 32))]
    assert sample["context_map"].shape == (24, 32) and sample["context_map"].dtype == torch.float32

    wrong = VOCSegmentation(
        root,
        "ImageSets/Segmentation/train.txt",
        "SegmentationClass",
        TOY_CLASSES,
        extras={"context_map": lambda i, hw: np.zeros((8, 8), np.float32)},
    )
    with pytest.raises(ValueError, match="must be at the image size 24x32"):
        wrong[0]
