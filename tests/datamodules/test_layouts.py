"""The stand-in VOC 2012 / COCO 2014 folders read as the real ones do, through the paper configs."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from src.datamodules import build_dataset
from src.datamodules.layouts import SIZES, write_coco, write_voc
from src.pipeline.checks import check_data_files
from tests.conftest import compose_cfg


def _data(experiment: str, root, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", "trainer=cpu", "pretrained=false"], tmp_path)
    with open_dict(cfg):
        cfg.data.root = str(root)
        cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def test_the_voc_layout_reads_through_the_voc_config(tmp_path):
    root = write_voc(tmp_path / "VOC2012", train_aug=4, train=2, val=2)
    cfg = _data("voc_conta", root, tmp_path)
    check_data_files(cfg)
    sizes = {}
    for split, n in (("train_aug", 4), ("train", 2), ("val", 2)):
        ds = build_dataset(cfg.data, split)
        assert len(ds) == n and ds.num_classes == 21
        sizes[split] = {tuple(ds[i]["size"].tolist()) for i in range(len(ds))}
        assert all(ds.labels[i].sum() >= 1 for i in range(len(ds)))
    assert sizes["train_aug"] == set(SIZES)  # landscape and portrait, as VOC
    assert build_dataset(cfg.data, "train").ids == build_dataset(cfg.data, "train_aug").ids[:2]


def test_the_coco_layout_reads_through_the_coco_config(tmp_path):
    root = write_coco(tmp_path / "coco", train=3, val=2)
    cfg = _data("coco_conta", root, tmp_path)
    check_data_files(cfg)
    for split, n in (("train", 3), ("val", 2)):
        ds = build_dataset(cfg.data, split)
        assert len(ds) == n and ds.num_classes == 81
        mask = ds.load_mask(0)
        assert mask.shape in SIZES and mask.max() >= 1


def test_max_images_keeps_the_first_images_of_a_split(tmp_path):
    root = write_voc(tmp_path / "VOC2012", train_aug=4, train=2, val=2)
    cfg = _data("voc_conta", root, tmp_path)
    with open_dict(cfg):
        cfg.data.max_images = 3
    assert build_dataset(cfg.data, "train_aug").ids == [f"2007_{i:06d}" for i in range(3)]
    cfg.data.max_images = 0
    with pytest.raises(ValueError, match="max_images=0"):
        build_dataset(cfg.data, "train_aug")
