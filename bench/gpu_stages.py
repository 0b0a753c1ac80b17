"""The GPU stages of IRNet + CONTA at paper shapes: images/s per GPU and peak memory, for each
trainer precision (fp32 `32-true` vs `bf16-mixed`, `trainer=gpu`'s default). Prints, never asserts;
bench/scale.py turns the rates into its wall-time projection.

Each stage runs through a Lightning Trainer with the precision under test, on the module its
pipeline stage builds from the composed experiment, fed synthetic tensors of the paper's shapes
made once in memory. Data loading is therefore not timed: the pipeline decodes and augments in
`num_workers` processes beside the GPU.

* train_cam          classifier step, cam.crop_size crops, one GPU's share of cam.batch_size
* make_cams          multi-scale + flip CAMs of a 500x375 image (the classifier's predict_step)
* train_cam_conta, make_cams_conta   the same with CONTA's context module and its inputs (m at
                     conta.size, the frame map), as rounds >= 1 run them
* train_affinity     IRNet affinity step, affinity.crop_size crops, one GPU's share of its batch
* make_pseudo_masks  boundary maps + one random walk + label maps of 500x375 and 375x500 images
* train_segmenter    DeepLab-v2 MSC step, segmenter.crop_size crops, one GPU's micro-batch
* predict_segmenter  MSC prediction of a 500x375 image with its stride-8 logits (val)
* confounders        the same prediction without logits (ConfounderUpdate's pass, train + val)

A GPU's share of a global batch is `src.pipeline.batching.rank_batch`'s; where the paper's batch
does not divide (DeepLab's 10 on 8 GPUs) the share is rounded up, as the README's 8-GPU recipe
(2 x 8) does. Backbones start from random weights, and the confounders of the CONTA stages
are random too (nothing is downloaded); the speed does not depend on them. Not timed: PSA's
and the seeded methods' stages.

    python bench/gpu_stages.py [--device cuda] [--steps 10] [--precision 32-true bf16-mixed]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import src.train  # noqa: E402, F401  (registers the config resolvers)
from src.datamodules.transforms import frame_grid  # noqa: E402
from src.models.context import Confounders  # noqa: E402
from src.pipeline.batching import rank_batch  # noqa: E402
from src.pipeline.stages.affinity import build_affinity_module, collate_with_cams  # noqa: E402
from src.pipeline.stages.cam import build_cam_classifier  # noqa: E402
from src.pipeline.stages.segmenter import build_segmenter  # noqa: E402

SIZE = (375, 500)  # (H, W) of a typical VOC image
PRECISIONS = ("32-true", "bf16-mixed")
TRAINING = ("train_cam", "train_cam_conta", "train_affinity", "train_segmenter")
# Stages of CONTA's rounds >= 1 that differ from round 0's, and the round-0 stage each replaces.
CONTA_STAGES = {"train_cam_conta": "train_cam", "make_cams_conta": "make_cams"}
# Random weights, none downloaded or read from an earlier stage: the rates do not depend on them.
STANDALONE = [
    "backbone.weights=null",
    "segmenter.backbone.weights=null",
    "affinity.backbone_init=pretrained",
    "segmenter.backbone_init=pretrained",
]


def compose_experiment(name: str, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=[f"experiment={name}", *STANDALONE, *overrides])


@dataclass(frozen=True)
class Rate:
    images_per_s: float
    batch: int  # images per forward on one GPU
    peak_gib: float | None  # peak allocated GPU memory (None on CPU)


class Meter(L.Callback):
    """Wall time of the batches after `warmup`, synchronised with the device."""

    def __init__(self, warmup: int):
        self.warmup, self.images, self.start, self.seconds = warmup, 0, None, None

    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def _batch_start(self, module, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def _batch_end(self, batch: dict) -> None:
        if self.start is not None:
            self.images += len(batch["image"])

    def _end(self, module) -> None:
        self._sync(module)
        self.seconds = time.perf_counter() - self.start

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._batch_start(module, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._batch_end(batch)

    def on_train_end(self, trainer, module):
        self._end(module)

    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(module, batch_idx)

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(batch)

    def on_predict_end(self, trainer, module):
        self._end(module)


class Repeated(Dataset):
    """Synthetic samples taken in turn, `n` in all, each under its own id."""

    def __init__(self, samples: list[dict], n: int):
        self.samples, self.n = samples, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {**self.samples[i % len(self.samples)], "id": f"img_{i:05d}"}


# -- samples at paper shapes --------------------------------------------------------------------
def _keys(classes: int, gen: torch.Generator, k: int = 2) -> torch.Tensor:
    """k foreground class ids (1-based) of `classes` (background included)."""
    return torch.randperm(classes - 1, generator=gen)[:k] + 1


def _multi_hot(keys: torch.Tensor, classes: int) -> torch.Tensor:
    label = torch.zeros(classes - 1)
    label[keys - 1] = 1
    return label


def _label_map(shape: tuple[int, int], keys: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Background, the keys in blocks, and an unsure (255) band: the losses' real branches."""
    h, w = shape
    label = torch.zeros(shape, dtype=torch.long)
    for i, key in enumerate(keys.tolist()):
        top, left = (int(v) for v in torch.randint(0, h // 2, (2,), generator=gen))
        label[top : top + h // 2, left + i * w // 4 : left + i * w // 4 + w // 2] = key
    label[:, : w // 16] = 255
    return label


def samples(
    cfg: DictConfig, size: tuple[int, int]
) -> dict[str, tuple[list[dict], Callable | None]]:
    """Per stage its samples (and its collate function, None = default). The walk alternates
    landscape and portrait images, so its batches mix sizes as VOC's do (collate_with_cams)."""
    gen = torch.Generator().manual_seed(0)
    classes = int(cfg.data.num_classes)
    keys = _keys(classes, gen)
    label = _multi_hot(keys, classes)
    full = {"image": torch.randn(3, *size, generator=gen), "label": label}
    full["size"] = torch.tensor(size)
    crop = {
        "train_cam": int(cfg.cam.crop_size),
        "train_affinity": int(cfg.affinity.crop_size),
        "train_segmenter": int(cfg.segmenter.crop_size),
    }

    def walk(hw: tuple[int, int]) -> dict:
        grid = ((hw[0] - 1) // 4 + 1, (hw[1] - 1) // 4 + 1)  # AffinityModule.boundary's
        cam = torch.rand(len(keys), *grid, generator=gen)
        image = torch.randn(3, *hw, generator=gen)
        return {**full, "image": image, "size": torch.tensor(hw), "cam": cam, "keys": keys.numpy()}

    def image(c: int) -> torch.Tensor:
        return torch.randn(3, c, c, generator=gen)

    c = crop["train_affinity"]
    affinity_label = _label_map((c, c), keys, gen)
    s = crop["train_segmenter"]

    def with_context(sample: dict) -> dict:
        """A CONTA classifier's inputs: the image's m and the frame map of its pixels."""
        h, w = sample["image"].shape[-2:]
        frame = torch.from_numpy(frame_grid(h, w).transpose(2, 0, 1).copy())
        m = torch.rand(*cfg.conta.size, generator=gen)
        return {**sample, "context_mask": m, "frame": frame}

    cam_crop = {"image": image(crop["train_cam"]), "label": label}
    return {
        "train_cam": ([cam_crop], None),
        "make_cams": ([full], None),
        "train_cam_conta": ([with_context(cam_crop)], None),
        "make_cams_conta": ([with_context(full)], None),
        "train_affinity": ([{"image": image(c), "ir_label": affinity_label}], None),
        "make_pseudo_masks": ([walk(size), walk(size[::-1])], collate_with_cams),
        "train_segmenter": ([{"image": image(s), "mask": _label_map((s, s), keys, gen)}], None),
        "predict_segmenter": ([full], None),
        "confounders": ([full], None),
    }


def random_confounders(cfg: DictConfig) -> Confounders:
    """A confounder set of the experiment's classes and size with random C (the classifier's
    context module is built from it; the samples carry their own m)."""
    n, size = int(cfg.data.num_classes) - 1, tuple(cfg.conta.size)
    gen = np.random.default_rng(0)
    return Confounders(
        centers=gen.random((n, *size), dtype=np.float32),
        prior=np.full(n, 1 / n, np.float32),
        counts=np.ones(n, np.int64),
        class_names=[f"class_{k}" for k in range(1, n + 1)],
        dataset=str(cfg.data.name),
        ids=["img_00000"],
        codes=np.zeros((1, *size), np.uint8),
    )


# -- one stage ----------------------------------------------------------------------------------
def _trainer(device: str, precision: str, meter: Meter, max_steps: int = -1) -> L.Trainer:
    return L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1 if max_steps > 0 else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[meter],
    )


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def time_stage(
    module: L.LightningModule,
    sample: tuple[list[dict], Callable | None],
    batch: int,
    *,
    train: bool,
    device: str,
    precision: str,
    batches: int,
    warmup: int,
) -> Rate:
    """Images/s over `batches` batches after `warmup`, training (fit) or predicting."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    data, collate = sample
    loader = DataLoader(Repeated(data, (warmup + batches) * batch), batch, collate_fn=collate)
    meter = Meter(warmup)
    if train:
        _trainer(device, precision, meter, warmup + batches).fit(module, train_dataloaders=loader)
    else:
        _trainer(device, precision, meter).predict(module, loader, return_predictions=False)
    return Rate(meter.images / meter.seconds, batch, _peak(device))


def gpu_share(batch_size: int, accumulate: int, gpus: int, key: str) -> int:
    """Images per forward on each of `gpus` GPUs; rounded up where the batch does not divide."""
    try:
        return rank_batch(batch_size, accumulate, gpus, key).per_rank
    except ValueError:
        return min(batch_size, math.ceil(batch_size * accumulate / gpus))


def modules(cfg: DictConfig) -> dict[str, tuple[Callable[[], L.LightningModule], bool]]:
    """Per stage: a fresh module as its stage builds it, and whether the stage trains."""

    def classifier():
        return build_cam_classifier(cfg)

    def conta_classifier():
        return build_cam_classifier(cfg, random_confounders(cfg))

    def affinity():
        return build_affinity_module(cfg, None)

    def segmenter(logits: bool):
        def build():
            module = build_segmenter(cfg)
            module.predict_logits = logits
            return module

        return build

    return {
        "train_cam": (classifier, True),
        "make_cams": (classifier, False),
        "train_cam_conta": (conta_classifier, True),
        "make_cams_conta": (conta_classifier, False),
        "train_affinity": (affinity, True),
        "make_pseudo_masks": (affinity, False),
        "train_segmenter": (segmenter(False), True),
        "predict_segmenter": (segmenter(True), False),
        "confounders": (segmenter(False), False),
    }


def batch_sizes(cfg: DictConfig, gpus: int) -> dict[str, int]:
    """Images per forward on one of `gpus` GPUs, per stage."""
    seg = cfg.segmenter
    return {
        "train_cam": gpu_share(cfg.cam.batch_size, 1, gpus, "cam.batch_size"),
        "make_cams": int(cfg.cam.inference.batch_size),
        "train_cam_conta": gpu_share(cfg.cam.batch_size, 1, gpus, "cam.batch_size"),
        "make_cams_conta": int(cfg.cam.inference.batch_size),
        "train_affinity": gpu_share(cfg.affinity.batch_size, 1, gpus, "affinity.batch_size"),
        "make_pseudo_masks": int(cfg.affinity.inference_batch_size),
        "train_segmenter": gpu_share(
            seg.batch_size, seg.accumulate_grad_batches, gpus, "segmenter.batch_size"
        ),
        "predict_segmenter": int(seg.inference.batch_size),
        "confounders": int(seg.inference.batch_size),
    }


def measure(
    cfg: DictConfig,
    device: str,
    precisions: list[str],
    gpus: list[int],
    steps: int,
    warmup: int,
    size: tuple[int, int] = SIZE,
) -> dict[tuple[str, str, int], Rate]:
    """(stage, precision, gpus) -> the rate of one GPU. Inference stages do not depend on the
    number of GPUs (each GPU predicts its share of the images alone) and are timed once."""
    made = samples(cfg, size)
    rates = {}
    for precision in precisions:
        for stage, (build, train) in modules(cfg).items():
            shares = {n: batch_sizes(cfg, n)[stage] for n in gpus}
            timed: dict[int, Rate] = {}
            for n, batch in shares.items():
                if batch not in timed:
                    L.seed_everything(0, verbose=False)
                    timed[batch] = time_stage(
                        build(),
                        made[stage],
                        batch,
                        train=train,
                        device=device,
                        precision=precision,
                        batches=steps,
                        warmup=warmup,
                    )
                rates[stage, precision, n] = timed[batch]
    return rates


def print_rates(rates: dict[tuple[str, str, int], Rate]) -> None:
    """One line per stage, precision and share (inference stages once: any number of GPUs)."""
    print(
        f"{'stage':18s} {'precision':11s} {'GPUs':>4s} {'batch':>5s} {'images/s':>9s} {'peak GiB':>8s}"
    )
    shown = set()
    for (stage, precision, gpus), r in rates.items():
        train = stage in TRAINING
        if not train and (stage, precision) in shown:
            continue
        shown.add((stage, precision))
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        who = f"{gpus:4d}" if train else " any"
        print(f"{stage:18s} {precision:11s} {who} {r.batch:5d} {r.images_per_s:9.2f} {peak:>8s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experiment", default="voc_conta")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="shares to time")
    parser.add_argument("--steps", type=int, default=10, help="timed batches per stage")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cfg = compose_experiment(args.experiment)
    print(f"{args.experiment} GPU stages on {args.device}, images {SIZE[1]}x{SIZE[0]}")
    print_rates(measure(cfg, args.device, args.precision, args.gpus, args.steps, args.warmup))


if __name__ == "__main__":
    main()
