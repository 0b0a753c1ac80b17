"""The synthetic set: layout, determinism, the context and layout confounders, the co-occurring
pair, and the options for sets off the home set (object_area, num_classes, label_ids)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from src.datamodules.coco import COCOSegmentation
from src.datamodules.datamodule import build_dataset, prepare_data
from src.datamodules.palette import VOC_PALETTE, read_label_png
from src.datamodules.synthetic import (
    ALL_CLASSES,
    ALL_COCO_CATEGORY_IDS,
    ALL_CONTEXTS,
    ALL_HOME_LAYOUT,
    COCO_CATEGORY_IDS,
    HOME_CONTEXT,
    HOME_LAYOUT,
    MAX_CLASSES,
    PAIR,
    SYNTH_CLASSES,
    SYNTH_CONTEXTS,
    ensure_synthetic_voc,
    render_image,
)
from src.datamodules.validation import DatasetError
from src.datamodules.voc import VOCSegmentation
from tests.conftest import compose_cfg

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


# -- the confounder: texture (default) | layout | both ----------------------------------------
LAYOUT = {"num_train": 200, "num_val": 100, "image_size": 64}


def _class_average_masks(root: Path, split: str = "train") -> np.ndarray:
    """CONTA's confounder set C: per class, the average of its masks over the images showing it."""
    size = json.loads((root / "meta.json").read_text())["generator"]["image_size"]
    acc, n = np.zeros((len(SYNTH_CLASSES), size, size)), np.zeros(len(SYNTH_CLASSES))
    for image_id in _ids(root, split):
        mask = read_label_png(root / "SegmentationClass" / f"{image_id}.png")
        for k in range(1, len(SYNTH_CLASSES)):
            if (mask == k).any():
                acc[k] += mask == k
                n[k] += 1
    assert (n[1:] > 0).all()
    return acc[1:] / n[1:, None, None]


def _centres(masks: np.ndarray) -> np.ndarray:
    """Centres of mass (y, x) of HxW weight maps, as fractions of the image size."""
    size = masks.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size] / size
    w = masks.reshape(len(masks), -1).sum(1)
    return np.stack([(masks * yy).sum((1, 2)) / w, (masks * xx).sum((1, 2)) / w], 1)


def _spread_of_c(root: Path) -> tuple[int, float]:
    """(pairs of classes whose average-mask centres are > 0.2 image apart, mean pairwise
    correlation of the class-average masks)."""
    c = _class_average_masks(root)
    centres = _centres(c)
    upper = np.triu_indices(len(c), 1)
    distance = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))[upper]
    return int((distance > 0.2).sum()), float(np.corrcoef(c.reshape(len(c), -1))[upper].mean())


@pytest.fixture(scope="module")
def layout_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout") / "synth"
    return ensure_synthetic_voc(root, **LAYOUT, confounder="layout")


def test_texture_is_the_default_confounder(tmp_path: Path):
    a = ensure_synthetic_voc(tmp_path / "a", **SMALL)
    b = ensure_synthetic_voc(tmp_path / "b", **SMALL, confounder="texture")
    assert _all_bytes(a) == _all_bytes(b)
    assert json.loads((a / "meta.json").read_text())["generator"]["confounder"] == "texture"


def test_texture_samples_are_unchanged():
    """``texture`` keeps the set's bytes from before the confounder option: a digest of the raw
    arrays of 8 samples (no JPEG/PNG codec involved). Only a change of numpy's random streams,
    or of the texture generator, may move it."""
    digest = hashlib.sha256()
    for i in range(8):
        s = render_image(np.random.default_rng([0, 0, i]), 64, 0.9, 0.7)
        for key in ("image", "mask", "context", "instances"):
            digest.update(np.ascontiguousarray(s[key]).tobytes())
    assert digest.hexdigest() == (
        "9e45c392967837c6fbd0e742882a61b69a59d313066f1ffbc5bcb6a43c22fe1a"
    )
    assert s["at_home"] == [False] * len(s["primaries"])  # texture: no home positions


def test_layout_is_deterministic_and_differs_from_texture(tmp_path: Path):
    a = ensure_synthetic_voc(tmp_path / "a", **SMALL, confounder="layout")
    b = ensure_synthetic_voc(tmp_path / "b", **SMALL, confounder="layout")
    t = ensure_synthetic_voc(tmp_path / "t", **SMALL)
    bytes_a = _all_bytes(a)
    assert bytes_a == _all_bytes(b)
    assert json.loads((a / "meta.json").read_text())["generator"]["confounder"] == "layout"
    images = [k for k in bytes_a if k.startswith("JPEGImages/")]
    bytes_t = _all_bytes(t)
    assert sum(bytes_a[k] != bytes_t[k] for k in images) >= len(images) - 1


def test_layout_class_average_masks_differ(layout_root: Path, biased_root: Path):
    """C is no longer one centred blob: the class-average masks sit at class-specific places."""
    far_pairs, corr = _spread_of_c(layout_root)
    assert far_pairs >= 6 and corr < 0.35, (far_pairs, corr)
    far_pairs_t, corr_t = _spread_of_c(biased_root)  # texture: the same blob for every class
    assert far_pairs_t <= 1 and corr_t > 0.5, (far_pairs_t, corr_t)
    meta = json.loads((layout_root / "meta.json").read_text())["stats"]["train"]
    assert meta["class_centroid_max_distance"] > 0.3
    centre = np.array(meta["class_centroid"]["disc"])
    np.testing.assert_allclose(
        centre, _centres(_class_average_masks(layout_root)[:1])[0], atol=0.03
    )


def test_layout_masks_vary_per_image(layout_root: Path):
    centroids = []
    disc = SYNTH_CLASSES.index("disc")
    for image_id in _ids(layout_root, "train"):
        mask = read_label_png(layout_root / "SegmentationClass" / f"{image_id}.png")
        if (mask == disc).sum() > 50:
            centroids.append(_centres((mask == disc)[None].astype(float))[0])
        assert not np.isin(mask[[0, -1]], range(1, 7)).any()  # objects stay inside the image
        assert not np.isin(mask[:, [0, -1]], range(1, 7)).any()
    spread = np.std(centroids, axis=0)
    assert len(centroids) > 20 and (spread > 0.04).all(), spread
    assert len({tuple(np.round(c, 2)) for c in centroids}) > 0.8 * len(centroids)


def test_layout_home_rate_train_vs_val(layout_root: Path):
    train_rate, n_train = _single_class_home_rate(layout_root, "train")
    val_rate, n_val = _single_class_home_rate(layout_root, "val")
    assert n_train > 80 and n_val > 40
    assert abs(train_rate - 0.9) < 0.08, train_rate
    assert abs(val_rate - 0.5) < 0.17, val_rate
    stats = json.loads((layout_root / "meta.json").read_text())["stats"]
    assert abs(stats["train"]["home_layout_rate"] - 0.9) < 0.06, stats["train"]
    assert abs(stats["val"]["home_layout_rate"] - 0.5) < 0.12, stats["val"]
    for split in ("train", "val"):  # layout: the partner region comes with the home position
        assert stats[split]["home_layout_rate"] == stats[split]["home_context_rate"]


def test_partner_regions_touch_their_object_on_the_class_side(layout_root: Path):
    sides = {"below": (1, 0), "above": (-1, 0), "right": (0, 1), "left": (0, -1)}
    n = touching = right_side = 0
    ratios = []
    for image_id in _ids(layout_root, "train"):
        mask = read_label_png(layout_root / "SegmentationClass" / f"{image_id}.png")
        context = read_label_png(layout_root / "ContextRegions" / f"{image_id}.png")
        assert not ((context > 0) & (mask > 0) & (mask < 255)).any()  # background pixels only
        classes = [int(k) for k in np.unique(mask) if k not in (0, 255)]
        if len(classes) != 1 or not (context == classes[0]).any():
            continue
        k = classes[0]
        obj, partner = mask == k, context == k
        n += 1
        grown = cv2.dilate(obj.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        touching += bool((grown & partner).any())
        ratios.append(partner.sum() / obj.sum())
        offset = _centres(partner[None].astype(float))[0] - _centres(obj[None].astype(float))[0]
        right_side += float(np.dot(offset, sides[HOME_LAYOUT[SYNTH_CLASSES[k]][1]])) > 0.05
    assert n > 80
    assert touching == n
    assert right_side >= 0.95 * n
    assert np.median(ratios) > 0.6  # sizable: comparable to the object's own area


def test_layout_keeps_the_rider_on_the_mount(layout_root: Path):
    mount, rider = SYNTH_CLASSES.index(PAIR["mount"]), SYNTH_CLASSES.index(PAIR["rider"])
    with_mount = touching = 0
    for image_id in _ids(layout_root, "train"):
        mask = read_label_png(layout_root / "SegmentationClass" / f"{image_id}.png")
        if (mask == mount).any() and (mask == rider).any():
            with_mount += 1
            grown = cv2.dilate((mask == rider).astype(np.uint8), np.ones((7, 7), np.uint8))
            touching += bool((grown.astype(bool) & (mask == mount)).any())
    assert with_mount > 15 and touching >= 0.9 * with_mount
    stats = json.loads((layout_root / "meta.json").read_text())["stats"]["train"]
    assert abs(stats["pair_rate"] - 0.7) < 0.2


def test_both_is_layout_plus_the_texture_surround(tmp_path: Path):
    args = {"num_train": 40, "num_val": 4, "image_size": 64}
    layout = ensure_synthetic_voc(tmp_path / "l", **args, confounder="layout")
    both = ensure_synthetic_voc(tmp_path / "b", **args, confounder="both")
    meta = json.loads((both / "meta.json").read_text())
    assert meta["generator"]["confounder"] == "both"
    assert meta["stats"]["train"]["home_layout_rate"] > 0.7
    larger = 0
    for image_id in _ids(both, "train"):
        # The same draws place the objects, so the masks are the same as for layout ...
        mask_l = read_label_png(layout / "SegmentationClass" / f"{image_id}.png")
        mask_b = read_label_png(both / "SegmentationClass" / f"{image_id}.png")
        np.testing.assert_array_equal(mask_l, mask_b)
        # ... and the regions grow by the surround around each object.
        ctx_l = read_label_png(layout / "ContextRegions" / f"{image_id}.png")
        ctx_b = read_label_png(both / "ContextRegions" / f"{image_id}.png")
        assert ((ctx_b > 0) | (ctx_l == 0)).all()
        larger += (ctx_b > 0).sum() > 1.3 * (ctx_l > 0).sum() > 0
    assert larger > 20


def test_unknown_confounder_is_refused(tmp_path: Path):
    match = r"data\.generator\.confounder.*texture, layout, both, twins"
    with pytest.raises(ValueError, match=match):
        ensure_synthetic_voc(tmp_path / "s", **SMALL, confounder="colour")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"data\.generator\.confounder"):
        render_image(np.random.default_rng(0), 64, 0.9, 0.7, "Layout")


def test_config_selects_layout_with_one_folder_per_confounder(synth_cfg, tmp_path: Path):
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "data" / "synth.yaml")
    assert conf.generator.confounder == "layout"
    for key in ("root", "cache_dir"):
        assert "${data.generator.confounder}" in OmegaConf.to_container(conf)[key]
    # prepare_data passes the generator block through, confounder included.
    synth_cfg.root = str(tmp_path / "synth_layout")
    synth_cfg.generator = {**SMALL, "confounder": "layout"}
    prepare_data(synth_cfg)
    meta = json.loads((tmp_path / "synth_layout" / "meta.json").read_text())
    assert meta["generator"]["confounder"] == "layout"


# -- off the home set: object_area, num_classes, label_ids -------------------------------------
def _values(root: Path, folder: str) -> set[int]:
    return {
        int(v) for p in sorted((root / folder).glob("*.png")) for v in np.unique(read_label_png(p))
    }


@pytest.mark.parametrize(
    ("confounder", "digest"),
    [
        ("layout", "824d75f9d2098be5149cb1a88ac59a36c031051e4c0481937f31c9745f6f5608"),
        ("both", "2dcf762dbf4860e56b230d9d61110177bb7bf2fe3e25c339ffe9fdcdcacd08bb"),
    ],
)
def test_layout_samples_are_unchanged(confounder: str, digest: str):
    """As test_texture_samples_are_unchanged, for layout / both: the digests were taken before
    object_area, num_classes and label_ids existed; their defaults must not move them."""
    sha = hashlib.sha256()
    for i in range(8):
        s = render_image(np.random.default_rng([0, 0, i]), 64, 0.9, 0.7, confounder)
        for key in ("image", "mask", "context", "instances"):
            sha.update(np.ascontiguousarray(s[key]).tobytes())
    assert sha.hexdigest() == digest


def test_default_options_give_the_same_set(tmp_path: Path):
    """The new options at their defaults, passed as Hydra passes them (lists), change nothing,
    and meta.json's generator record does not list them (older folders stay complete)."""
    a = ensure_synthetic_voc(tmp_path / "a", **SMALL, confounder="layout")
    b = ensure_synthetic_voc(
        tmp_path / "b",
        **SMALL,
        confounder="layout",
        num_classes=6,
        object_area=[0.1, 0.15],
        label_ids=None,
    )
    assert _all_bytes(a) == _all_bytes(b)
    meta = json.loads((a / "meta.json").read_text())
    assert not {"num_classes", "object_area", "label_ids"} & set(meta["generator"])
    assert meta["classes"] == list(SYNTH_CLASSES) and meta["contexts"] == list(SYNTH_CONTEXTS)


def test_twelve_classes(tmp_path: Path):
    names = ALL_CLASSES[1:]
    assert len(names) == MAX_CLASSES == len(ALL_CONTEXTS) == len(set(ALL_CONTEXTS))
    assert set(ALL_HOME_LAYOUT) == set(names)
    # The first six homes are as before; all twelve anchors are distinct and inside the image.
    assert {c: ALL_HOME_LAYOUT[c] for c in SYNTH_CLASSES[1:]} == HOME_LAYOUT
    anchors = np.array([ALL_HOME_LAYOUT[c][0] for c in names])
    distance = np.hypot(*(anchors[:, None] - anchors[None]).transpose(2, 0, 1))
    assert distance[np.triu_indices(len(names), 1)].min() > 0.14
    assert ((anchors >= 0.25) & (anchors <= 0.75)).all()
    ids = ALL_COCO_CATEGORY_IDS
    assert len(set(ids)) == len(ids) == MAX_CLASSES and ids[:6] == COCO_CATEGORY_IDS

    root = ensure_synthetic_voc(
        tmp_path / "s", num_train=60, num_val=4, image_size=64, num_classes=12, confounder="layout"
    )
    meta = json.loads((root / "meta.json").read_text())
    assert meta["classes"] == list(ALL_CLASSES) and meta["contexts"] == list(ALL_CONTEXTS)
    assert meta["home_context"] == dict(zip(names, ALL_CONTEXTS, strict=True))
    assert meta["generator"]["num_classes"] == 12
    seen = set()
    for image_id in _ids(root, "train"):
        seen |= set(np.unique(read_label_png(root / "SegmentationClass" / f"{image_id}.png")))
    assert seen == set(range(13)) | {255}  # every class appears in 60 images
    assert _values(root, "ContextRegions") == set(range(13))  # every home texture appears
    # ... and the twelve home textures look different: their mean colours in the JPEGs differ.
    acc = np.zeros((13, 4))
    for image_id in _ids(root, "train"):
        context = read_label_png(root / "ContextRegions" / f"{image_id}.png")
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as img:
            rgb = np.asarray(img, np.float64) / 255
        for k in np.unique(context[context > 0]):
            acc[k] += (*rgb[context == k].sum(0), (context == k).sum())
    mean = acc[1:, :3] / acc[1:, 3:]
    colour_gap = np.linalg.norm(mean[:, None] - mean[None], axis=2)
    assert colour_gap[np.triu_indices(len(names), 1)].min() > 0.08
    stats = meta["stats"]["train"]
    assert set(stats["class_centroid"]) == set(names)
    assert stats["home_layout_rate"] > 0.75
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(ids)
    assert [c["name"] for c in coco["categories"]] == list(names)


@pytest.mark.parametrize("confounder", ["texture", "layout"])
def test_small_objects(tmp_path: Path, confounder: str):
    root = ensure_synthetic_voc(
        tmp_path / "s",
        num_train=60,
        num_val=4,
        image_size=96,
        object_area=(0.03, 0.06),
        confounder=confounder,
    )
    stats = json.loads((root / "meta.json").read_text())["stats"]["train"]
    area = stats["object_area"]  # full shapes, before occlusion
    assert 0.03 < area["mean"] < 0.06 and area["min"] > 0.028 and area["max"] < 0.062, area
    assert stats["visible_area_mean"] <= area["mean"]
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    by_image: dict[int, list[int]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["area"])
    single = np.array([v[0] for v in by_image.values() if len(v) == 1]) / 96**2
    assert len(single) > 20 and single.min() > 0.028 and single.max() < 0.062
    assert 0.035 < single.mean() < 0.055


def test_label_ids_relabel_masks_and_contexts_only(tmp_path: Path):
    label_ids = [1, 3, 6, 8, 12, 14, 15, 19]
    args = {"num_train": 30, "num_val": 4, "image_size": 64, "num_classes": 8}
    plain = ensure_synthetic_voc(tmp_path / "p", **args, confounder="both")
    mapped = ensure_synthetic_voc(tmp_path / "m", **args, confounder="both", label_ids=label_ids)
    assert _values(mapped, "SegmentationClass") <= {0, 255, *label_ids}
    assert _values(mapped, "ContextRegions") <= {0, *label_ids}
    lut = np.arange(256)
    lut[1:9] = label_ids
    for image_id in _ids(plain, "train") + _ids(plain, "val"):
        for folder in ("SegmentationClass", "ContextRegions"):
            a = read_label_png(plain / folder / f"{image_id}.png")
            b = read_label_png(mapped / folder / f"{image_id}.png")
            np.testing.assert_array_equal(lut[a], b)  # region of class k's home: label_ids[k-1]
        jpg = f"JPEGImages/{image_id}.jpg"
        assert (plain / jpg).read_bytes() == (mapped / jpg).read_bytes()
    # The COCO export keeps one category per class; meta.json names the values written.
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (plain / name).read_bytes() == (mapped / name).read_bytes()
    meta = json.loads((mapped / "meta.json").read_text())
    assert meta["generator"]["label_ids"] == label_ids
    assert len(meta["classes"]) == 20 and meta["classes"][2] == "unused_2"
    for k, i in enumerate(label_ids, start=1):
        assert meta["classes"][i] == ALL_CLASSES[k]
        assert meta["contexts"][i - 1] == ALL_CONTEXTS[k - 1]
    # The reader names the context regions by their values, so leakage is scored per class id.
    names = list(meta["classes"]) + ["unused_20"]
    ds = VOCSegmentation(
        mapped,
        "ImageSets/Segmentation/train.txt",
        "SegmentationClass",
        names,
        context_dir="ContextRegions",
    )
    assert ds.context_names[19] == "night" and ds.context_names[1] == "sky"
    assert set(np.nonzero(ds.labels.sum(0))[0] + 1) <= set(label_ids)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_classes": 5}, r"data\.generator\.num_classes=5 is out of range.*6\.\.12"),
        ({"num_classes": 13}, r"data\.generator\.num_classes=13"),
        ({"num_classes": "many"}, r"data\.generator\.num_classes"),
        ({"label_ids": [1, 2, 3]}, r"data\.generator\.label_ids=\[1, 2, 3\] has 3 entries.*Fix"),
        ({"label_ids": [1, 2, 3, 4, 5, 5]}, r"label_ids=.*repeats an id.*Fix: give 6 distinct"),
        ({"label_ids": [0, 1, 2, 3, 4, 5]}, r"label_ids=.*outside 1\.\.254.*Fix"),
        ({"label_ids": [1, 2, 3, 4, 5, 255]}, r"label_ids=.*outside 1\.\.254"),
        ({"label_ids": [1, 2, 3, 4, 5, 6.5]}, r"label_ids=.*not a list of integers"),
        ({"label_ids": 7}, r"data\.generator\.label_ids=7 is not a list of integers"),
        ({"object_area": [0.06, 0.03]}, r"data\.generator\.object_area=\[0\.06, 0\.03\].*Fix"),
        ({"object_area": [0.0, 0.03]}, r"data\.generator\.object_area"),
        ({"object_area": [0.2, 0.3]}, r"data\.generator\.object_area.*min <= 0\.15"),
        ({"object_area": [0.1]}, r"data\.generator\.object_area"),
        ({"object_area": [0.005, 0.01]}, r"object_area min 0\.005 of a 48px image.*Fix"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict, match: str):
    with pytest.raises(ValueError, match=match):
        ensure_synthetic_voc(tmp_path / "s", **SMALL, **options)
    assert not (tmp_path / "s").exists()


def test_hydra_lists_are_recognised(synth_cfg, tmp_path: Path):
    """prepare_data passes ListConfigs; the folder is generated once, then found complete."""
    synth_cfg.root = str(tmp_path / "synth")
    synth_cfg.generator = {
        **SMALL,
        "confounder": "layout",
        "num_classes": 7,
        "object_area": [0.05, 0.08],
        "label_ids": [2, 4, 6, 8, 10, 12, 14],
    }
    prepare_data(synth_cfg)
    meta = tmp_path / "synth" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    prepare_data(synth_cfg)
    assert meta.stat().st_mtime_ns == stamp
    generator = json.loads(meta.read_text())["generator"]
    assert generator["object_area"] == [0.05, 0.08] and generator["label_ids"][-1] == 14


@pytest.mark.parametrize(
    ("data", "generator"),
    [
        ("synth_small", {"object_area": [0.03, 0.06]}),
        ("synth_many", {"num_classes": 12}),
        ("synth_voc21", {"num_classes": 8, "label_ids": [1, 3, 6, 8, 12, 14, 15, 19]}),
    ],
)
def test_data_configs_off_the_home_set(data: str, generator: dict, tmp_path: Path):
    small = [f"data.generator.{k}={v}" for k, v in {"num_train": 12, "num_val": 4}.items()]
    cfg = compose_cfg([f"data={data}", *small], tmp_path)
    assert cfg.data.name == "synth" and f"/{data}_" in cfg.data.root
    assert f"/{data}_" in cfg.data.cache_dir
    for key, value in generator.items():
        assert OmegaConf.to_container(cfg.data.generator)[key] == value
    assert len(cfg.data.class_names) == cfg.data.num_classes
    ds = build_dataset(cfg.data, "train")
    assert len(ds) == 12 and ds.class_names == list(cfg.data.class_names)
    meta = json.loads((Path(cfg.data.root) / "meta.json").read_text())
    # The config's names agree with the values the generator writes (the prefix it uses).
    assert list(cfg.data.class_names)[: len(meta["classes"])] == meta["classes"]
    stamp = (Path(cfg.data.root) / "meta.json").stat().st_mtime_ns
    build_dataset(cfg.data, "val")
    assert (Path(cfg.data.root) / "meta.json").stat().st_mtime_ns == stamp  # not regenerated


def _single_objects(confounder: str, n: int = 160) -> dict[int, list[tuple[float, float]]]:
    """Per class: (fill ratio of its bounding box, median hue in degrees) of the lone objects
    (one object, no rider) among ``n`` 96 px samples."""
    found: dict[int, list[tuple[float, float]]] = {}
    for i in range(n):
        s = render_image(np.random.default_rng([0, 0, i]), 96, 0.9, 0.7, confounder)
        if len(s["instance_classes"]) != 1:
            continue
        cls = s["instance_classes"][0]
        mask = s["instances"] == 1
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        hsv = cv2.cvtColor(s["image"], cv2.COLOR_RGB2HSV_FULL)
        hue = float(np.median(hsv[mask][:, 0])) * 360 / 256
        found.setdefault(cls, []).append((fill, hue))
    return found


def test_twins_share_shape_and_nearly_their_colour():
    """twins: classes 3/4 (triangle/cross) and 5/6 (ring/diamond) are drawn with one shape each
    (the pair's first) and hues that overlap; under layout each pair's shapes differ and their
    hues are ~60 deg apart. (Lone squares are rare: the square is the rider's mount.)"""
    twins, layout = _single_objects("twins"), _single_objects("layout")
    fill = {c: np.median([f for f, _ in v]) for c, v in twins.items()}
    layout_fill = {c: np.median([f for f, _ in v]) for c, v in layout.items()}
    for a, b in ((3, 4), (5, 6)):
        assert min(len(twins[a]), len(twins[b])) >= 8
        assert abs(fill[a] - fill[b]) < 0.03  # the same silhouette (box fill ratio)
        assert abs(layout_fill[a] - layout_fill[b]) > 0.04  # ... which layout's shapes are not
    hue3 = np.array([h for _, h in twins[3]])
    hue4 = np.array([h for _, h in twins[4]])
    # Hue ranges 142 +- 12 and 158 +- 12 (plus pattern / noise): they overlap, the means differ.
    assert hue3.min() > 125 and hue4.max() < 175
    assert hue4.min() < hue3.max()  # overlapping hues: colour does not decide
    assert 8 < hue4.mean() - hue3.mean() < 26


def test_twins_same_hue_leave_only_context_to_tell_twins_apart():
    """twins_same_hue: the twins' shapes as under twins, and one hue distribution for both."""
    same = _single_objects("twins_same_hue")
    for a, b in ((3, 4), (5, 6)):
        assert min(len(same[a]), len(same[b])) >= 8
        hue_a, hue_b = (np.array([h for _, h in same[c]]) for c in (a, b))
        assert abs(hue_a.mean() - hue_b.mean()) < 6  # twins: 8-26 degrees apart
        fill_a, fill_b = (np.median([f for f, _ in same[c]]) for c in (a, b))
        assert abs(fill_a - fill_b) < 0.03


def test_twins_keep_the_layout_bias(tmp_path: Path):
    """The home (anchor + partner texture) still holds far more often in train than in val."""
    root = ensure_synthetic_voc(
        tmp_path / "t", num_train=80, num_val=40, image_size=64, confounder="twins"
    )
    meta = json.loads((root / "meta.json").read_text())
    assert meta["generator"]["confounder"] == "twins"
    train, val = meta["stats"]["train"], meta["stats"]["val"]
    assert train["home_layout_rate"] > 0.75 and val["home_layout_rate"] < 0.7
