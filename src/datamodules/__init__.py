"""Data layer: VOC / COCO / synthetic readers, transforms, input validation, the datamodule."""

from src.datamodules.coco import COCOSegmentation
from src.datamodules.datamodule import (
    ExtraTarget,
    WSSSDataModule,
    build_dataset,
    collate_same_size,
    configured_splits,
    prepare_data,
)
from src.datamodules.palette import (
    IGNORE_INDEX,
    VOC_PALETTE,
    colorize,
    read_label_png,
    save_label_png,
)
from src.datamodules.synthetic import (
    HOME_CONTEXT,
    PAIR,
    SYNTH_CLASSES,
    SYNTH_CONTEXTS,
    ensure_synthetic_voc,
)
from src.datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegTransform,
    eval_transform,
    train_transform,
    val_transform,
)
from src.datamodules.validation import DatasetError
from src.datamodules.voc import SegmentationDataset, VOCSegmentation

__all__ = [
    "COCOSegmentation",
    "DatasetError",
    "ExtraTarget",
    "HOME_CONTEXT",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAIR",
    "SYNTH_CLASSES",
    "SYNTH_CONTEXTS",
    "SegTransform",
    "SegmentationDataset",
    "VOCSegmentation",
    "VOC_PALETTE",
    "WSSSDataModule",
    "build_dataset",
    "collate_same_size",
    "colorize",
    "configured_splits",
    "ensure_synthetic_voc",
    "eval_transform",
    "prepare_data",
    "read_label_png",
    "save_label_png",
    "train_transform",
    "val_transform",
]
