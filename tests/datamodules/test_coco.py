"""COCO reader: non-contiguous category ids, crowd -> 255, the overlap rule, the mask cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from src.datamodules.coco import COCOSegmentation, rasterise
from src.datamodules.validation import DatasetError

from .conftest import write_jpg

H, W = 40, 50


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = m.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": [m.shape[0], m.shape[1]]}


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _write_coco(root: Path, *, images=("img1", "img2", "img3"), extra_anns=(), categories=None):
    for name in images:
        write_jpg(root / "images" / f"{name}.jpg", np.full((H, W, 3), 128, np.uint8))
    anns = [
        # Listed first but smaller: the area rule, not the order, puts the person on top.
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": _compressed_rle(_rect(10, 20, 15, 25)),
            "area": 100,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 8,
            "iscrowd": 0,
            "segmentation": [[5, 5, 45, 5, 45, 35, 5, 35]],
            "area": 1200,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 20,
            "iscrowd": 1,
            "segmentation": _uncompressed_rle(_rect(30, 40, 0, 10)),
            "area": 100,
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 20,
            "iscrowd": 0,
            "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
            "area": 400,
        },
        *extra_anns,
    ]
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"{name}.jpg", "height": H, "width": W}
            for i, name in enumerate(images)
        ],
        "annotations": anns,
        # Unsorted and non-contiguous on purpose.
        "categories": categories
        or [{"id": 20, "name": "dog"}, {"id": 3, "name": "person"}, {"id": 8, "name": "horse"}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_toy.json").write_text(json.dumps(coco))
    return root


def _coco(root: Path, cache: Path, **kwargs) -> COCOSegmentation:
    return COCOSegmentation(
        root, "images", "annotations/instances_toy.json", cache_dir=cache, **kwargs
    )


def test_category_ids_map_to_contiguous_labels_in_sorted_id_order(tmp_path: Path):
    ds = _coco(_write_coco(tmp_path / "coco"), tmp_path / "cache", on_empty_label="skip")
    assert ds.class_names == ["background", "person", "horse", "dog"]  # ids 3, 8, 20
    assert ds.cat_to_label == {3: 1, 8: 2, 20: 3}
    assert ds.ids == ["img1", "img2"]  # img3 has no annotation
    # Crowd dog is not an image-level label; crowd regions carry no label.
    assert ds.labels.tolist() == [[1, 1, 0], [0, 0, 1]]


def test_mask_rule_crowd_ignored_smaller_on_top(tmp_path: Path):
    ds = _coco(_write_coco(tmp_path / "coco"), tmp_path / "cache", on_empty_label="skip")
    mask = ds.load_mask(0)
    assert mask.shape == (H, W)
    assert (mask[10:20, 15:25] == 1).all()  # person over horse
    horse = _rect(5, 35, 5, 45).astype(bool) & ~_rect(10, 20, 15, 25).astype(bool)
    assert (mask[horse] == 2).mean() > 0.95  # polygon edges may round by a pixel
    assert (mask[36:40, 0:5] == 255).all()  # crowd region outside the horse: ignore
    assert (mask[31:34, 6:9] == 2).all()  # a labelled instance wins over crowd
    assert set(np.unique(mask)) == {0, 1, 2, 255}
    assert ds[0]["mask"].dtype.is_floating_point is False


def test_equal_areas_later_annotation_on_top():
    a, b = _rect(0, 10, 0, 10), _rect(5, 15, 5, 15)
    mask = rasterise([(1, False, _compressed_rle(a)), (2, False, _compressed_rle(b))], H, W)
    assert mask[7, 7] == 2


def test_masks_are_rasterised_once_and_cached(tmp_path: Path):
    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    first = _coco(root, cache, on_empty_label="skip")
    m0 = first.load_mask(0)
    assert first.masks_rasterised == 1
    png = first.mask_path(0)
    assert png.is_file() and png.parent.parent == cache
    stamp = png.stat().st_mtime_ns
    first.load_mask(0)
    second = _coco(root, cache, on_empty_label="skip")
    np.testing.assert_array_equal(second.load_mask(0), m0)
    assert first.masks_rasterised == 1 and second.masks_rasterised == 0
    assert png.stat().st_mtime_ns == stamp  # written once
    assert not list(png.parent.glob(".*"))  # no temp files left behind


def test_image_without_annotation_errors_by_default(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .*instances_toy\.json .*img3"):
        _coco(root, tmp_path / "cache")


def test_unknown_category_id(tmp_path: Path):
    extra = [
        {
            "id": 9,
            "image_id": 2,
            "category_id": 99,
            "iscrowd": 0,
            "segmentation": [[1, 1, 5, 1, 5, 5]],
            "area": 8,
        }
    ]
    root = _write_coco(tmp_path / "coco", extra_anns=extra)
    with pytest.raises(DatasetError, match=r"instances_toy\.json uses category ids \[99\]"):
        _coco(root, tmp_path / "cache")


def test_image_size_differs_from_json(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    write_jpg(root / "images" / "img2.jpg", np.zeros((H + 4, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"size mismatch: image .*img2\.jpg is 44x50"):
        _coco(root, tmp_path / "cache", on_empty_label="skip")


def test_missing_image_file(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    (root / "images" / "img2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"have no image in .*images: img2 ->"):
        _coco(root, tmp_path / "cache")


def test_missing_or_broken_annotation_file(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"COCO annotation file .*nope\.json not found"):
        COCOSegmentation(root, "images", "annotations/nope.json", cache_dir=tmp_path)
    ann = root / "annotations" / "instances_toy.json"
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match=re.escape(str(ann)) + " is not valid JSON"):
        _coco(root, tmp_path / "cache")
    ann.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="not in COCO instances format|no 'images' list"):
        _coco(root, tmp_path / "cache")


def test_cache_dir_is_required(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match="set data.cache_dir"):
        _coco(root, None)
