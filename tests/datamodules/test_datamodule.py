"""Factory and LightningDataModule on the tiny synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from src.datamodules import (
    COCOSegmentation,
    DatasetError,
    ExtraTarget,
    VOCSegmentation,
    WSSSDataModule,
    build_dataset,
    collate_same_size,
    prepare_data,
    train_transform,
)
from src.datamodules.synthetic import SYNTH_CLASSES

from .conftest import TINY

CROP = 48


def test_build_dataset_voc_and_coco_formats(synth_cfg):
    voc = build_dataset(synth_cfg, "val")
    assert isinstance(voc, VOCSegmentation) and len(voc) == TINY["num_val"]
    assert "context" in voc[0]
    coco_cfg = synth_cfg.copy()
    coco_cfg.format = "coco"
    coco_cfg.splits = {
        "val": {"images": "JPEGImages", "annotations": "annotations/instances_val.json"}
    }
    coco = build_dataset(coco_cfg, "val")
    assert isinstance(coco, COCOSegmentation) and coco.class_names == list(SYNTH_CLASSES)
    np.testing.assert_array_equal(coco.labels, voc.labels)


def test_unknown_split_lists_the_configured_ones(synth_cfg):
    with pytest.raises(
        DatasetError, match=r"split 'train_aug' is not configured.*\['train', 'val'\]"
    ):
        build_dataset(synth_cfg, "train_aug")


def test_num_classes_must_match_class_names(synth_cfg):
    synth_cfg.num_classes = 21
    with pytest.raises(DatasetError, match="data.num_classes=21 but data.class_names lists 7"):
        build_dataset(synth_cfg, "val")


def test_prepare_data_is_a_no_op_for_data_on_disk(tmp_path):
    cfg = OmegaConf.create({"name": "voc", "root": str(tmp_path / "absent")})
    prepare_data(cfg)
    assert not (tmp_path / "absent").exists()


def test_one_batch_from_each_loader(synth_cfg):
    def context_map(image_id: str, hw: tuple[int, int]) -> np.ndarray:
        return np.full(hw, 0.25, np.float32)

    extra = {"context_map": ExtraTarget("float", context_map)}
    dm = WSSSDataModule(
        synth_cfg,
        train_split="train",
        val_split="val",
        predict_split="val",
        batch_size=4,
        num_workers=0,
        crop_size=CROP,
        predict_batch_size=2,
        extra_train_targets=extra,
        extra_eval_targets=extra,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == len(SYNTH_CLASSES)
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (4, 3, CROP, CROP) and train["mask"].shape == (4, CROP, CROP)
    assert train["context"].shape == (4, CROP, CROP) and train["label"].shape == (4, 6)
    assert train["context_map"].shape == (4, CROP, CROP)
    assert set(train["context_map"].unique().tolist()) <= {0.0, 0.25}  # 0 = padding
    assert len(dm.train_dataloader()) == TINY["num_train"] // 4  # drop_last

    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, CROP, CROP)  # top-left crop of the 64 px images
    assert val["id"][0] == "val_00000"

    size = TINY["image_size"]
    pred = next(iter(dm.predict_dataloader()))
    assert pred["image"].shape == (2, 3, size, size)  # full images
    assert pred["size"].tolist() == [[size, size]] * 2
    assert (pred["context_map"] == 0.25).all()


def test_val_loader_is_empty_without_a_val_split(synth_cfg):
    dm = WSSSDataModule(synth_cfg, train_split="train", batch_size=4, num_workers=0, crop_size=CROP)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(DatasetError, match="no predict data set"):
        dm.predict_dataloader()


def test_train_split_smaller_than_batch(synth_cfg):
    dm = WSSSDataModule(synth_cfg, train_split="val", batch_size=16, num_workers=0)
    with pytest.raises(DatasetError, match="has 8 images, fewer than batch_size=16"):
        dm.setup("fit")


def test_predict_collate_rejects_mixed_sizes():
    def sample(i, h, w):
        return {"id": f"x{i}", "image": torch.zeros(3, h, w), "index": i}

    batch = collate_same_size([sample(0, 8, 8), sample(1, 8, 8)])
    assert batch["image"].shape == (2, 3, 8, 8)
    with pytest.raises(DatasetError, match=r"different sizes.*predict_batch_size=1"):
        collate_same_size([sample(0, 8, 8), sample(1, 8, 10)])


def test_workers_get_distinct_augmentation_streams(synth_cfg):
    """albumentations seeds once at construction; without the per-worker reseed both forked
    workers would crop alike. Works through wrappers and without a worker_init_fn."""
    ds = build_dataset(synth_cfg, "train", train_transform(24, seed=0))
    loader = DataLoader(Subset(ds, [0, 0, 0, 0]), batch_size=1, num_workers=2)
    images = [b["image"] for b in loader]  # worker 0 yields items 0, 2; worker 1 yields 1, 3
    assert not torch.equal(images[0], images[1])
