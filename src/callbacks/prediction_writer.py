"""Prediction writers: every rank writes its own shard of per-image artifacts, atomically."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from src.datamodules.palette import save_label_png
from src.utils.io import atomic_save_npz


class NpzPredictionWriter(BasePredictionWriter):
    """Writes each predicted item (a dict with an `id` and arrays) to `out_dir/{id}.npz`.

    Files appear only when complete (temp + rename), so a crashed run can skip what exists.
    """

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        for item in prediction:
            arrays = {k: v for k, v in item.items() if k != "id"}
            atomic_save_npz(self.out_dir / f"{item['id']}.npz", **arrays)


class PngPredictionWriter(BasePredictionWriter):
    """Writes item[key] of each predicted item as a palette PNG `out_dir/{id}.png` (atomic);
    other arrays of the item (e.g. the boundary map) go to `out_dir/{id}.npz` when `keep_extra`."""

    def __init__(self, out_dir: Path, key: str = "mask", keep_extra: bool = False):
        super().__init__(write_interval="batch")
        self.out_dir, self.key, self.keep_extra = Path(out_dir), key, keep_extra

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        for item in prediction:
            if self.keep_extra:
                extra = {k: v for k, v in item.items() if k not in ("id", self.key)}
                atomic_save_npz(self.out_dir / f"{item['id']}.npz", **extra)
            save_label_png(self.out_dir / f"{item['id']}.png", item[self.key])
