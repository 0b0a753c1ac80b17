"""CAM stage throughput on the synthetic set, and our training step vs a bare torchvision step.

    python bench/cam_stage.py [--steps 30] [key=value config overrides ...]

Prints classifier training images/s (the Lightning stage loop, data loading included), CAM
inference images/s (multi-scale + flip), and the ratio of our training step to a bare
forward+backward+SGD step of the same torchvision backbone on the same batch, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.datamodules import WSSSDataModule, build_dataset, eval_transform, prepare_data  # noqa: E402
from src.datamodules.datamodule import collate_same_size  # noqa: E402
from src.models.backbone import _build_resnet, _set_stride_and_dilation  # noqa: E402
from src.pipeline.stages.cam import build_cam_classifier  # noqa: E402


class Throughput(L.Callback):
    """Images/s over the training batches after a warm-up."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.images, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:  # global: batch_idx restarts every epoch
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.images += len(batch["image"])

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def bare_step_rate(backbone_cfg, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """The torchvision model with the same strides, GAP + fc head, a plain loop: the floor."""
    net = _build_resnet(backbone_cfg.arch)
    net.conv1.stride = (backbone_cfg.strides[0],) * 2
    for layer, s, d in zip(
        (net.layer2, net.layer3, net.layer4),
        backbone_cfg.strides[1:],
        backbone_cfg.dilations[1:],
        strict=True,
    ):
        _set_stride_and_dilation(layer, s, d)
    net.fc = torch.nn.Linear(net.fc.in_features, labels.shape[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = F.multilabel_soft_margin_loss(net(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args, overrides = parser.parse_known_args()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["experiment=synth_cam", *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    torch.set_num_threads(torch.get_num_threads())
    prepare_data(cfg.data)
    L.seed_everything(0, verbose=False)

    module = build_cam_classifier(cfg)
    dm = WSSSDataModule(
        cfg.data,
        train_split=cfg.data.train_split,
        batch_size=cfg.cam.batch_size,
        num_workers=cfg.num_workers,
        crop_size=cfg.cam.crop_size,
        scale_range=cfg.cam.scale_range,
        resize_long=cfg.cam.resize_long,
    )
    meter = Throughput()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps + meter.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[meter],
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    ours = meter.rate()

    batch = next(iter(dm.train_dataloader()))
    bare = bare_step_rate(cfg.backbone, batch["image"], batch["label"], args.steps)

    dataset = build_dataset(
        cfg.data, cfg.data.train_split, eval_transform(cfg.data.mean, cfg.data.std)
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.cam.inference.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_same_size,
    )
    module.eval()
    start, images = time.perf_counter(), 0
    with torch.no_grad():
        for i, b in enumerate(loader):
            module.predict_step(b, i)
            images += len(b["image"])
    infer = images / (time.perf_counter() - start)

    print(
        f"backbone {cfg.backbone.arch}, crop {cfg.cam.crop_size}, batch {cfg.cam.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"classifier training (Lightning stage loop): {ours:8.1f} images/s")
    print(f"bare torchvision fwd+bwd+SGD, same batch:   {bare:8.1f} images/s")
    print(f"ratio ours / bare:                          {ours / bare:8.2f}")
    print(f"CAM inference (scales {list(cfg.cam.inference.scales)}, flip): {infer:8.1f} images/s")


if __name__ == "__main__":
    main()
