"""Pieces of the seeded stages (src/methods/seeded.py) on the tiny synthetic set: the cue
loader WithCues (cues flipped with the image), the cue grid and the pseudo-mask CRF job."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.datamodules import build_dataset, prepare_data
from src.datamodules.transforms import load_frame
from src.methods.seeded import (
    WithCues,
    _crf_mask_job,
    cue_grid,
    joined_cue_stats,
    seeded_transform,
)
from src.models.backbone import ResNetBackbone
from src.models.seeded import seeded_net
from src.postprocess.crf import CRFParams
from src.postprocess.cues import CueStats, write_cues
from src.utils.errors import MissingArtifactError
from tests.conftest import TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeded")
    cfg = compose_cfg(["method=sec", TINY, "seeded.flip=true"], tmp)
    prepare_data(cfg.data)
    return cfg


def class_ids(label) -> np.ndarray:
    return np.flatnonzero(np.asarray(label) > 0.5) + 1


def asymmetric_cues(num_classes: int, grid: tuple[int, int], ids: np.ndarray) -> np.ndarray:
    """Cues no left-right flip maps onto themselves: each class a block on the left, whose size
    depends on the class, the background an L in the bottom-right corner."""
    gh, gw = grid
    cues = np.zeros((num_classes, gh, gw), bool)
    for c in ids:
        cues[c, 1 : 1 + c % 3 + 1, 0 : c % 2 + 2] = True
    cues[0, gh - 1, gw - 3 :] = True
    cues[0, gh - 3 :, gw - 1] = True
    return cues


def write_all(cfg, dataset, cue_dir) -> dict[str, np.ndarray]:
    n, grid = int(cfg.data.num_classes), cue_grid(cfg)
    written = {}
    for i, image_id in enumerate(dataset.ids):
        ids = class_ids(dataset.labels[i])
        cues = asymmetric_cues(n, grid, ids)
        write_cues(cue_dir / f"{image_id}.npz", cues, ids, data_name=cfg.data.name, num_classes=n)
        written[image_id] = cues
    return written


def test_with_cues_flips_the_cues_with_the_image(cfg, tmp_path):
    base = build_dataset(
        cfg.data,
        cfg.data.train_split,
        seeded_transform(cfg, train=True),
        extras={"frame": load_frame},
    )
    plain = build_dataset(cfg.data, cfg.data.train_split, seeded_transform(cfg, train=False))
    written = write_all(cfg, base, tmp_path)
    dataset = WithCues(base, cfg, tmp_path)
    assert len(dataset) == len(base) and dataset.grid == (8, 8)
    flipped = []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert "frame" not in sample
        image = plain[i]["image"]
        was_flipped = torch.equal(sample["image"], image.flip(-1))
        assert was_flipped or torch.equal(sample["image"], image), sample["id"]
        cues = torch.from_numpy(written[sample["id"]])
        assert sample["cues"].dtype == torch.bool and sample["cues"].shape == cues.shape
        assert torch.equal(sample["cues"], cues.flip(-1) if was_flipped else cues), sample["id"]
        assert not torch.equal(cues, cues.flip(-1))  # the pattern tells a flip
        flipped.append(was_flipped)
    assert any(flipped) and not all(flipped)  # both cases seen (24 draws at p = 0.5)


def test_with_cues_rejects_cues_of_another_data_set_or_grid(cfg, tmp_path):
    base = build_dataset(
        cfg.data,
        cfg.data.train_split,
        seeded_transform(cfg, train=True),
        extras={"frame": load_frame},
    )
    n, image_id = int(cfg.data.num_classes), base.ids[0]
    ids = class_ids(base.labels[0])
    path = tmp_path / f"{image_id}.npz"
    dataset = WithCues(base, cfg, tmp_path)

    write_cues(path, asymmetric_cues(n, (8, 8), ids), ids, data_name="voc", num_classes=n)
    with pytest.raises(
        MissingArtifactError, match=rf"(?s){re.escape(str(path))}.*'voc'.*make_cues"
    ):
        dataset[0]
    write_cues(path, asymmetric_cues(n, (12, 12), ids), ids, data_name=cfg.data.name, num_classes=n)
    with pytest.raises(
        MissingArtifactError, match=rf"(?s){re.escape(str(path))}.*\(12, 12\) grid.*\(8, 8\)"
    ):
        dataset[0]
    path.unlink()
    with pytest.raises(MissingArtifactError, match=rf"{re.escape(str(path))} is missing"):
        dataset[0]


def test_multi_scale_masks_read_the_largest_scale(cfg):
    """With seeded.masks.scales the prediction set comes at the largest size (each scale is
    resized down from it); training keeps input_size, and so does the cue grid."""
    multi = OmegaConf.merge(cfg, {"seeded": {"masks": {"scales": [48, 64, 80]}}})
    train = build_dataset(
        multi.data,
        multi.data.train_split,
        seeded_transform(multi, train=True),
        extras={"frame": load_frame},
    )
    predict = build_dataset(multi.data, multi.data.train_split, seeded_transform(multi, False))
    assert train[0]["image"].shape[-2:] == (64, 64) and cue_grid(multi) == (8, 8)
    assert predict[0]["image"].shape[-2:] == (80, 80)
    assert cfg.seeded.masks.scales is None  # the CPU recipe: input_size alone


def test_cue_grid_is_the_nets_output_grid():
    def grid(size: int) -> tuple[int, int]:
        return cue_grid(OmegaConf.create({"seeded": {"input_size": size}}))

    assert grid(321) == (41, 41)  # SEC's grid
    assert grid(96) == (12, 12)  # the CPU recipes'
    assert grid(64) == (8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = ResNetBackbone(arch="resnet_tiny", strides=(2, 2, 1, 1), norm="train")
        net = seeded_net(backbone, 3, hidden=8, dilation=2).eval()
        with torch.no_grad():
            assert tuple(net(torch.zeros(1, 3, 96, 96)).shape[-2:]) == grid(96)
    finally:
        torch.set_num_threads(threads)


def grid_probs(mask: np.ndarray, c: int, grid: int = 8) -> np.ndarray:
    """(2, grid, grid) float16 [background, c] from the share of class c in each cell."""
    h, w = mask.shape
    share = (mask == c).reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3))
    fg = 0.05 + 0.9 * share
    return np.stack([1 - fg, fg]).astype(np.float16)


@pytest.fixture
def one_class_image(cfg):
    """(dataset, index, class) of the first training image holding a single class."""
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    for i in range(len(dataset)):
        ids = class_ids(dataset.labels[i])
        if len(ids) == 1:
            return dataset, i, int(ids[0])
    raise AssertionError("no single-class image in the tiny set")


def test_crf_mask_job_writes_a_palette_mask_of_the_kept_classes(cfg, one_class_image, tmp_path):
    dataset, i, c = one_class_image
    image_id, gt = dataset.ids[i], dataset.load_mask(i)
    probs_path = tmp_path / f"{image_id}.npz"
    np.savez(probs_path, keys=np.array([0, c], np.int16), probs=grid_probs(gt, c))
    params = CRFParams.from_config(cfg.seeded.test_crf, "seeded.test_crf")
    out = tmp_path / "masks"
    out.mkdir()
    _crf_mask_job((image_id, dataset.image_paths[i], probs_path), params=params, out_dir=out)
    with Image.open(out / f"{image_id}.png") as png:
        assert png.mode == "P"
        mask = np.array(png)
    assert mask.shape == gt.shape == tuple(dataset[i]["size"].tolist())
    assert set(np.unique(mask).tolist()) == {0, c}
    valid = gt != 255
    inter = ((mask == c) & (gt == c) & valid).sum()
    union = (((mask == c) | (gt == c)) & valid).sum()
    assert inter / union > 0.5  # the object is where the probabilities put it


def test_crf_mask_job_names_a_missing_or_corrupt_probs_file(cfg, one_class_image, tmp_path):
    dataset, i, _ = one_class_image
    params = CRFParams.from_config(cfg.seeded.test_crf, "seeded.test_crf")
    path = tmp_path / "probs.npz"
    job = (dataset.ids[i], dataset.image_paths[i], path)
    pattern = rf"(?s){re.escape(str(path))}.*make_seeded_masks"
    with pytest.raises(MissingArtifactError, match=pattern):
        _crf_mask_job(job, params=params, out_dir=tmp_path)
    path.write_bytes(b"not an npz archive")
    with pytest.raises(MissingArtifactError, match=pattern):
        _crf_mask_job(job, params=params, out_dir=tmp_path)
    np.savez(path, keys=np.array([0, 1], np.int16))  # no probs
    no_probs = rf"(?s){re.escape(str(path))}: missing arrays \['probs'\].*make_seeded_masks"
    with pytest.raises(MissingArtifactError, match=no_probs):
        _crf_mask_job(job, params=params, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "keys, probs",
    [
        ([0], np.full((2, 8, 8), 0.5, np.float16)),
        ([0, 300], np.full((2, 8, 8), 0.5, np.float16)),  # would be written as 44 (uint8)
        ([0, 1], np.full((8, 8), 0.5, np.float16)),
        ([0, 1, 2], np.full((2, 8, 8), 0.5, np.float16)),
        ([1, 0], np.full((2, 8, 8), 0.5, np.float16)),
        ([0, 1], np.full((2, 8, 8), np.nan, np.float16)),
        ([0, 1], np.zeros((2, 8, 8), np.float16)),
    ],
    ids=[
        "fewer-keys-than-channels",
        "key-over-255",
        "2d-probs",
        "more-keys",
        "background-not-first",
        "nan",
        "all-zero",
    ],
)
def test_crf_mask_job_rejects_probs_whose_keys_do_not_fit(
    cfg, one_class_image, tmp_path, keys, probs
):
    dataset, i, _ = one_class_image
    path = tmp_path / "probs.npz"
    np.savez(path, keys=np.array(keys, np.int16), probs=probs)
    job = (dataset.ids[i], dataset.image_paths[i], path)
    params = CRFParams.from_config(cfg.seeded.test_crf, "seeded.test_crf")
    with pytest.raises(MissingArtifactError, match=re.escape(str(path))):
        _crf_mask_job(job, params=params, out_dir=tmp_path)


def test_joined_cue_stats_equal_one_pass_over_the_images():
    # Five images, every labelled class without a foreground cue: the examples are capped at 3,
    # so a shard's own first examples must be re-ordered by image, as one pass names them.
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(5)]
    records = []
    for image_id in ids:
        fg = np.zeros((4, 3, 3), bool)
        fg[0] = rng.random((3, 3)) < 0.5
        records.append((image_id, fg, rng.random((3, 3)) < 0.5, [1, 3]))
    one = CueStats(max_examples=3)
    for record in records:
        one.update(*record)
    shards = [CueStats(max_examples=3), CueStats(max_examples=3)]
    for i, record in enumerate(records):  # strided, as my_share deals them
        shards[i % 2].update(*record)
    joined = joined_cue_stats(shards, ids).summary()
    assert joined == one.summary()
    assert joined["empty_foreground_examples"] == [["img0", 1], ["img0", 3], ["img1", 1]]
