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


# -- file names, output names ------------------------------------------------------------------
def _edit_json(root: Path, edit) -> Path:
    """Rewrite the toy json through ``edit(dict)``."""
    ann = root / "annotations" / "instances_toy.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return ann


def _set_file_name(image_id: int, value: str):
    def edit(data):
        next(im for im in data["images"] if im["id"] == image_id)["file_name"] = value

    return edit


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ABS", "is an absolute path"),
        ("../outside/evil.jpg", "has a '..' component"),
        ("sub/../../outside/evil.jpg", "has a '..' component"),
        ("..\\outside\\evil.jpg", "has a '..' component"),
        ("C:\\outside\\evil.jpg", "is an absolute path"),
        ("\\\\server\\share\\evil.jpg", "is an absolute path"),
        ("", "is not a non-empty string"),
    ],
)
def test_unsafe_file_name_is_refused(tmp_path: Path, value: str, problem: str):
    root = _write_coco(tmp_path / "coco")
    outside = tmp_path / "coco" / "outside" / "evil.jpg"
    write_jpg(outside, np.zeros((H, W, 3), np.uint8))  # exists: only the name is at fault
    value = str(outside) if value == "ABS" else value
    ann = _edit_json(root, _set_file_name(2, value))
    with pytest.raises(DatasetError) as err:
        _coco(root, tmp_path / "cache", on_empty_label="skip")
    msg = str(err.value)
    assert str(ann) in msg and f"image id 2: file_name {value!r} {problem}" in msg
    assert "Fix:" in msg
    assert not list((tmp_path / "cache").glob("coco_index_*/index.npz"))  # nothing cached


def test_file_name_escaping_through_a_symlink_is_refused(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    outside = tmp_path / "elsewhere"
    write_jpg(outside / "secret.jpg", np.zeros((H, W, 3), np.uint8))
    (root / "images" / "img2.jpg").unlink()
    (root / "images" / "img2.jpg").symlink_to(outside / "secret.jpg")  # file link
    with pytest.raises(DatasetError) as err:
        _coco(root, tmp_path / "cache", on_empty_label="skip")
    msg = str(err.value)
    assert "image id 2: file_name 'img2.jpg' resolves to" in msg and "secret.jpg" in msg
    assert "outside the image folder" in msg and "instances_toy.json" in msg

    (root / "images" / "img2.jpg").unlink()
    write_jpg(root / "images" / "img2.jpg", np.zeros((H, W, 3), np.uint8))
    (root / "images" / "sub").symlink_to(outside, target_is_directory=True)  # folder link
    _edit_json(root, _set_file_name(1, "sub/secret.jpg"))
    with pytest.raises(DatasetError, match=r"image id 1: file_name 'sub/secret\.jpg' resolves"):
        _coco(root, tmp_path / "cache", on_empty_label="skip")


def test_symlinks_that_stay_inside_the_image_folder_are_fine(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    (root / "images" / "real").mkdir()
    (root / "images" / "img1.jpg").rename(root / "images" / "real" / "one.jpg")
    (root / "images" / "img1.jpg").symlink_to(root / "images" / "real" / "one.jpg")
    # The whole image folder behind a symlink (a common layout) is fine too.
    (root / "images").rename(root / "images_on_disk")
    (root / "images").symlink_to(root / "images_on_disk", target_is_directory=True)
    ds = _coco(root, tmp_path / "cache", on_empty_label="skip")
    assert ds.ids == ["img1", "img2"]


@pytest.mark.parametrize(
    ("names", "shared"),
    [
        (["same.jpg", "same.jpg"], "same <- image ids 1 ('same.jpg'), 2 ('same.jpg')"),
        (["a/img.jpg", "b/img.jpg"], "img <- image ids 1 ('a/img.jpg'), 2 ('b/img.jpg')"),
        (["img.jpg", "img.png"], "img <- image ids 1 ('img.jpg'), 2 ('img.png')"),
        (["Img.jpg", "img.jpg"], "Img, img <- image ids 1 ('Img.jpg'), 2 ('img.jpg')"),
    ],
)
def test_images_sharing_an_output_name_are_refused(tmp_path: Path, names, shared):
    root = _write_coco(tmp_path / "coco")
    for name in names:
        write_jpg(root / "images" / name, np.zeros((H, W, 3), np.uint8))

    def edit(data):
        for im, name in zip(data["images"], names, strict=False):
            im["file_name"] = name

    ann = _edit_json(root, edit)
    with pytest.raises(DatasetError) as err:
        _coco(root, tmp_path / "cache", on_empty_label="skip")
    msg = str(err.value)
    assert str(ann) in msg and "1 output name(s) are shared" in msg and shared in msg
    assert "would overwrite each other" in msg and "Fix:" in msg


def test_duplicate_or_non_integer_image_ids_are_refused(tmp_path: Path):
    root = _write_coco(tmp_path / "coco")
    _edit_json(root, lambda d: d["images"][2].update(id=2))  # img3 reuses img2's id
    with pytest.raises(DatasetError, match=r"instances_toy\.json: image ids 2 \(2x\) appear"):
        _coco(root, tmp_path / "cache", on_empty_label="skip")
    _edit_json(root, lambda d: d["images"][2].update(id="3"))  # 3 and "3" would both be 3.png
    with pytest.raises(DatasetError, match=r"lack an integer 'id'.*'3' \(entry 2\)"):
        _coco(root, tmp_path / "cache", on_empty_label="skip")


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ({"size": [H + 1, W], "counts": [H * W]}, "RLE size"),
        ({"size": [H, W], "counts": [5, 10]}, "uncompressed RLE counts do not cover"),
        ({"size": [H, W], "counts": "0<"}, "compressed RLE counts do not cover"),
        ({"counts": "0<"}, "neither a polygon list nor an RLE"),
    ],
)
def test_malformed_segmentation_is_refused_at_construction(tmp_path: Path, segmentation, problem):
    bad = {"id": 9, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": segmentation}
    root = _write_coco(tmp_path / "coco", extra_anns=[bad])
    with pytest.raises(DatasetError) as err:
        _coco(root, tmp_path / "cache", on_empty_label="skip")
    msg = str(err.value)
    assert "instances_toy.json: annotation 9 of image id 2 (img2.jpg)" in msg and problem in msg


# -- lazy rasterisation from the on-disk store -------------------------------------------------
def _random_polygon(rng: np.random.Generator, h: int, w: int, points: int) -> list[float]:
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    r = rng.uniform(0.1, 0.45) * min(h, w) * rng.uniform(0.5, 1.0, points)
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    xy = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    return np.clip(xy, 0, [w - 1, h - 1]).round(2).ravel().tolist()


def _write_random_coco(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        write_jpg(root / "images" / f"r{i:03d}.jpg", np.full((H, W, 3), 90, np.uint8))
        images.append({"id": 100 + 7 * i, "file_name": f"r{i:03d}.jpg", "height": H, "width": W})
        for _ in range(int(rng.integers(1, 6))):
            kind = rng.integers(0, 4)
            crowd = int(kind == 3)
            if kind == 0:  # several polygons for one instance
                segm = [_random_polygon(rng, H, W, 8) for _ in range(2)]
            elif kind == 1:
                segm = _compressed_rle(
                    _rect(*sorted(rng.integers(0, H, 2)), *sorted(rng.integers(0, W, 2)))
                )
            else:
                segm = [_random_polygon(rng, H, W, int(rng.integers(3, 20)))]
            if crowd:
                segm = _uncompressed_rle(
                    _rect(0, int(rng.integers(1, H)), 0, int(rng.integers(1, W)))
                )
            cat = int(rng.choice([3, 8, 20]))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + 7 * i,
                    "category_id": cat,
                    "iscrowd": crowd,
                    "segmentation": segm,
                }
            )
    cats = [{"id": 20, "name": "dog"}, {"id": 3, "name": "person"}, {"id": 8, "name": "horse"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann = root / "annotations" / "instances_toy.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann


@pytest.mark.filterwarnings("ignore:__array__ implementation")
def test_lazy_masks_equal_pycocotools_annToMask(tmp_path: Path):
    from pycocotools.coco import COCO

    root = tmp_path / "coco"
    ann = _write_random_coco(root, 12)
    ds = _coco(root, tmp_path / "cache", on_empty_label="skip")
    coco = COCO(str(ann))
    label_of = {3: 1, 8: 2, 20: 3}
    checked = 0
    for image_id in sorted(coco.imgs):
        name = Path(coco.imgs[image_id]["file_name"]).stem
        if name not in ds.ids:
            continue
        mask = ds.load_mask(ds.ids.index(name))
        anns = coco.imgToAnns[image_id]
        crowd = np.zeros((H, W), bool)
        union = {k: np.zeros((H, W), bool) for k in (1, 2, 3)}
        reference = np.zeros((H, W), np.uint8)
        instances = []
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            if a["iscrowd"]:
                crowd |= m
                reference[m] = 255
            else:
                union[label_of[a["category_id"]]] |= m
                instances.append((label_of[a["category_id"]], m))
        for k, m in sorted(instances, key=lambda x: -int(x[1].sum())):
            reference[m] = k
        np.testing.assert_array_equal(mask, reference)
        any_instance = np.logical_or.reduce(list(union.values()))
        for k, u in union.items():
            assert not ((mask == k) & ~u).any()  # class k only where a k instance is
        assert ((mask >= 1) & (mask <= 3) == any_instance).all()
        assert ((mask == 255) == (crowd & ~any_instance)).all()
        expected = [float(any(lb == k for lb, _ in instances)) for k in (1, 2, 3)]
        assert ds.labels[ds.ids.index(name)].tolist() == expected
        checked += 1
    assert checked == len(ds) >= 8


def test_data_set_holds_no_annotations(tmp_path: Path):
    """Pickled (as sent to DataLoader workers) the data set is as big with 40x more polygon
    points: the annotations live on disk."""
    import pickle

    sizes = []
    for points in (10, 400):
        root = tmp_path / f"coco{points}"
        _write_coco(root)

        def edit(data, points=points):
            rng = np.random.default_rng(0)
            for a in data["annotations"]:
                if isinstance(a["segmentation"], list):
                    a["segmentation"] = [_random_polygon(rng, H, W, points)]

        _edit_json(root, edit)
        ds = _coco(root, tmp_path / "cache", on_empty_label="skip")
        assert not hasattr(ds, "coco")
        sizes.append(len(pickle.dumps(ds)))
    # Paths differ by one character in the root name ("coco10" vs "coco400").
    assert abs(sizes[1] - sizes[0]) < 64, sizes


def test_index_is_reused_without_reading_the_json(tmp_path: Path, monkeypatch):
    import src.datamodules.coco as coco_module

    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    first = _coco(root, cache, on_empty_label="skip")
    index = first.index_dir / "index.npz"
    stamp = index.stat().st_mtime_ns

    def no_json(path):
        raise AssertionError(f"the json {path} was read again")

    monkeypatch.setattr(coco_module, "load_coco", no_json)
    second = _coco(root, cache, on_empty_label="skip")
    assert second.ids == first.ids and second.class_names == first.class_names
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.load_mask(0), first.load_mask(0))
    assert index.stat().st_mtime_ns == stamp
    # prepare_coco (e.g. on rank 0 before the ranks build their data sets) is a no-op now.
    assert coco_module.prepare_coco(root / "annotations" / "instances_toy.json", cache) == (
        first.index_dir
    )


def test_prepare_coco_builds_the_index_up_front(tmp_path: Path):
    from src.datamodules.coco import prepare_coco

    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    folder = prepare_coco(root / "annotations" / "instances_toy.json", cache)
    assert (folder / "index.npz").is_file() and (folder / "segments.bin").is_file()
    ds = _coco(root, cache, on_empty_label="skip")
    assert ds.index_dir == folder and ds.ids == ["img1", "img2"]


def test_edited_json_gets_a_new_index(tmp_path: Path):
    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    first = _coco(root, cache, on_empty_label="skip")
    _edit_json(root, lambda d: d["annotations"].append({**d["annotations"][3], "image_id": 3}))
    second = _coco(root, cache, on_empty_label="skip")
    assert second.index_dir != first.index_dir and second.ids == ["img1", "img2", "img3"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_size", "bad_values"])
def test_corrupt_cached_mask_is_rasterised_again(tmp_path: Path, caplog, damage: str):
    from src.datamodules.palette import save_label_png

    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    ds = _coco(root, cache, on_empty_label="skip")
    good = ds.load_mask(0)
    png = ds.mask_path(0)
    if damage == "truncate":
        png.write_bytes(png.read_bytes()[:40])
    elif damage == "garbage":
        png.write_bytes(b"not a png")
    elif damage == "wrong_size":
        save_label_png(png, np.zeros((H - 1, W), np.uint8))
    else:
        save_label_png(png, np.full((H, W), 7, np.uint8))  # only classes 0..3 and 255 exist
    again = _coco(root, cache, on_empty_label="skip")
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(again.load_mask(0), good)
    assert again.masks_rasterised == 1
    assert f"cached COCO mask {png}" in caplog.text and "rasterising it again" in caplog.text
    np.testing.assert_array_equal(read_back := ds.load_mask(0), good)  # the file is healed
    assert read_back.shape == (H, W) and ds.masks_rasterised == 1


def test_corrupt_segment_store_is_detected(tmp_path: Path, caplog):
    root, cache = _write_coco(tmp_path / "coco"), tmp_path / "cache"
    ds = _coco(root, cache, on_empty_label="skip")
    store = ds.segments_path
    data = bytearray(store.read_bytes())
    data[5] ^= 0x01  # same length: only the record checksum can tell
    store.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as err:
        ds.load_mask(0)
    msg = str(err.value)
    assert f"COCO segment store {store}: the record of image img1 fails its checksum" in msg
    assert f"Fix: delete the folder {ds.index_dir}" in msg
    # A store of the wrong length, or an unreadable index, is rebuilt at construction.
    store.write_bytes(bytes(data[:-3]))
    with caplog.at_level("WARNING"):
        again = _coco(root, cache, on_empty_label="skip")
    assert "rebuilding the COCO index" in caplog.text
    assert again.load_mask(0).shape == (H, W)
    (again.index_dir / "index.npz").write_bytes(b"PK\x03\x04 broken")
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = _coco(root, cache, on_empty_label="skip")
    assert "rebuilding the COCO index" in caplog.text and third.ids == ["img1", "img2"]
