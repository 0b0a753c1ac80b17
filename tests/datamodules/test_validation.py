"""Every bad-input case gets a DatasetError that names the file and the fix."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.datamodules.palette import save_label_png
from src.datamodules.validation import DatasetError
from src.datamodules.voc import VOCSegmentation

from .conftest import TOY_CLASSES, write_jpg

LIST = "ImageSets/Segmentation/train.txt"


def _voc(root: Path, **kwargs) -> VOCSegmentation:
    return VOCSegmentation(root, LIST, "SegmentationClass", TOY_CLASSES, **kwargs)


def test_missing_root_names_path_and_config_key(tmp_path: Path):
    missing = tmp_path / "nowhere" / "VOC2012"
    with pytest.raises(DatasetError, match=re.escape(str(missing)) + ".*data.root"):
        _voc(missing)


def test_missing_list_file(make_voc, tmp_path: Path):
    root = make_voc()
    with pytest.raises(DatasetError, match=r"split list file .*val\.txt not found"):
        VOCSegmentation(root, "ImageSets/Segmentation/val.txt", "SegmentationClass", TOY_CLASSES)


def test_listed_id_without_image(make_voc):
    root = make_voc()
    (root / "JPEGImages" / "a2.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"1 id\(s\) listed in .*train\.txt have no image: a2 ->"
    ):
        _voc(root)


def test_listed_id_without_mask(make_voc):
    root = make_voc()
    (root / "SegmentationClass" / "a3.png").unlink()
    with pytest.raises(DatasetError, match=r"have no mask in .*SegmentationClass: a3 ->"):
        _voc(root)


def test_corrupt_image(make_voc):
    root = make_voc()
    bad = root / "JPEGImages" / "a1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + " is unreadable or corrupt.*Fix"):
        _voc(root)


@pytest.mark.parametrize("cut", [2, 100, 3])  # keep 1/2, all but 100 bytes, all but 3
def test_truncated_image_fails_at_setup_naming_the_file(make_voc, cut):
    root = make_voc()
    path = root / "JPEGImages" / "a1.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == 2 else data[:-cut])  # header intact
    with pytest.raises(DatasetError, match=re.escape(str(path)) + " is unreadable or corrupt"):
        _voc(root)
    ds = _voc(root, validate=False)  # unchecked, it still fails naming the file when read
    with pytest.raises(DatasetError, match=re.escape(str(path)) + " could not be decoded"):
        ds[0]


def test_mask_ids_out_of_range(make_voc):
    root = make_voc()
    path = root / "SegmentationClass" / "a2.png"
    mask = np.zeros((24, 32), np.uint8)
    mask[5:10, 5:10] = 7
    mask[12:14, 5:10] = 9
    mask[0] = 255  # allowed
    save_label_png(path, mask)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + r" holds class ids \[7, 9\]"):
        _voc(root)


def test_colour_mask_is_rejected(make_voc):
    root = make_voc()
    path = root / "SegmentationClass" / "a1.png"
    Image.new("RGB", (32, 24), (128, 0, 0)).save(path)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + r".*mode 'RGB'"):
        _voc(root)


def test_image_mask_size_mismatch(make_voc):
    root = make_voc()
    write_jpg(root / "JPEGImages" / "a3.jpg", np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(
        DatasetError, match=r"size mismatch: image .*a3\.jpg is 30x32.*a3\.png is 24x32"
    ):
        _voc(root)


def test_empty_split(make_voc):
    root = make_voc()
    (root / LIST).write_text("\n\n")
    with pytest.raises(DatasetError, match=r"train\.txt lists no images"):
        _voc(root)


def test_image_without_foreground_errors_by_default(make_voc):
    root = make_voc({"a1": [1], "empty1": [], "empty2": []})
    with pytest.raises(
        DatasetError, match=r"2 image\(s\) .* no foreground class.*empty1, empty2.*skip"
    ):
        _voc(root)


def test_image_without_foreground_skipped_and_counted(make_voc, caplog):
    root = make_voc({"a1": [1], "empty1": [], "a2": [2]})
    with caplog.at_level(logging.WARNING):
        ds = _voc(root, on_empty_label="skip")
    assert ds.ids == ["a1", "a2"] and len(ds.labels) == 2
    assert ds[1]["id"] == "a2" and ds[1]["label"].tolist() == [0, 1, 0]
    assert "skipped 1 of 3 images" in caplog.text


def test_unknown_empty_label_policy(make_voc):
    with pytest.raises(DatasetError, match="on_empty_label='drop'"):
        _voc(make_voc(), on_empty_label="drop")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_are_converted(make_voc, mode: str):
    root = make_voc()
    path = root / "JPEGImages" / "a1.jpg"
    rgb = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    img.save(path, format="PNG")  # a PNG under .jpg: PIL reads the content, not the suffix
    ds = _voc(root)
    image = ds.load_image(0)
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert ds[0]["image"].shape == (3, 24, 32)


def test_missing_context_map(make_voc):
    root = make_voc()
    (root / "ContextRegions").mkdir()
    with pytest.raises(DatasetError, match=r"3 id\(s\) .* have no context map"):
        _voc(root, context_dir="ContextRegions")


@pytest.mark.parametrize(
    "lines, line_no, problem",
    [
        (["a1", "a2", "a1"], 3, "id 'a1' repeats line 1.*Fix: list each image once"),
        (["a1", "sub/a2"], 2, "'sub/a2' is not a plain image id.*Fix: list one image id"),
        (["a1.v5", "a2"], 1, "'a1.v5' is not a plain image id"),
        (["a1", "a2.jpg"], 2, "'a2.jpg' is not a plain image id"),
        (["a1", ".."], 2, "'..' is not a plain image id"),
        (["/JPEGImages/sub/a1.jpg /SegmentationClassAug/sub/a1.png"], 1, "not an image/mask"),
        (["/JPEGImages/a1.jpg /SegmentationClassAug/a2.png"], 1, "not an image/mask pair"),
        (["/JPEGImages/a1.v5.jpg /SegmentationClassAug/a1.v5.png"], 1, "not a plain image id"),
        (["a1 a2 a3"], 1, "3 fields, expected an id or a pair"),
    ],
)
def test_a_bad_list_line_names_the_file_and_the_line(make_voc, lines, line_no, problem):
    root = make_voc()
    (root / LIST).write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"{root / LIST}, line {line_no}: ") + ".*" + problem
    ):
        _voc(root)


def test_a_list_that_is_not_utf8_names_the_line(make_voc):
    root = make_voc()
    (root / LIST).write_bytes(b"a1\na2\xff\na3\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"{root / LIST}, line 2: not UTF-8") + ".*Fix"
    ):
        _voc(root)


def test_both_list_formats_with_a_bom_and_blank_lines_are_read(make_voc):
    root = make_voc()
    (root / LIST).write_bytes(
        "\ufeffa1\n\n  /JPEGImages/a2.jpg  SegmentationClass/a2.png\na3\n".encode()
    )
    assert _voc(root).ids == ["a1", "a2", "a3"]
