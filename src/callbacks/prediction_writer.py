"""Prediction writers: every rank writes its own shard of per-image artifacts, atomically.

Files appear only when complete (temp + rename), so a crashed run can skip what exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from src.datamodules.palette import save_label_png
from src.postprocess.logits_store import check_logits_store, encode_logits
from src.utils.io import atomic_save_npz


class PerImageWriter(BasePredictionWriter):
    """predict_step returns a list of dicts, each with an `id`; write_item stores one of them."""

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        for item in prediction:
            self.write_item(item)

    def write_item(self, item: dict) -> None:
        raise NotImplementedError


class NpzPredictionWriter(PerImageWriter):
    """Every array of the item (all keys but `id`) into `out_dir/{id}.npz` (CAMs), passed
    through `encode` first when given, zlib-compressed when `compress`."""

    def __init__(
        self,
        out_dir: Path,
        encode: Callable[[dict], dict] | None = None,
        compress: bool = False,
    ):
        super().__init__(out_dir)
        self.encode, self.compress = encode, compress

    def write_item(self, item: dict) -> None:
        arrays = {k: v for k, v in item.items() if k != "id"}
        if self.encode is not None:
            arrays = self.encode(arrays)
        atomic_save_npz(self.out_dir / f"{item['id']}.npz", compress=self.compress, **arrays)


class PngPredictionWriter(PerImageWriter):
    """item[key] as a VOC palette PNG `out_dir/{id}.png` (pseudo-masks, segmentations)."""

    def __init__(self, out_dir: Path, key: str = "mask"):
        super().__init__(out_dir)
        self.key = key

    def write_item(self, item: dict) -> None:
        save_label_png(self.out_dir / f"{item['id']}.png", item[self.key])


class SegmentationWriter(PngPredictionWriter):
    """Masks as palette PNGs in `out_dir`; with `logits_dir`, each item's stride-8 `logits` also
    go to `logits_dir/{id}.npz` for the CRF step (as deeplab-pytorch keeps them), stored as
    `src.postprocess.logits_store` says (`logits_dtype`, `logits_min_prob`)."""

    def __init__(
        self,
        out_dir: Path,
        logits_dir: Path | None = None,
        logits_dtype: str = "float16",
        logits_min_prob: float = 0.0,
    ):
        super().__init__(out_dir, key="mask")
        self.logits_dir = None if logits_dir is None else Path(logits_dir)
        check_logits_store(logits_dtype, logits_min_prob)
        self.logits_dtype, self.logits_min_prob = logits_dtype, logits_min_prob

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.logits_dir is not None:
            self.logits_dir.mkdir(parents=True, exist_ok=True)

    def write_item(self, item: dict) -> None:
        if self.logits_dir is not None:
            # Logits first: a mask PNG on disk then implies its logits are there too.
            arrays = encode_logits(item["logits"], self.logits_dtype, self.logits_min_prob)
            compress = self.logits_dtype == "uint8"
            atomic_save_npz(self.logits_dir / f"{item['id']}.npz", compress=compress, **arrays)
        super().write_item(item)
