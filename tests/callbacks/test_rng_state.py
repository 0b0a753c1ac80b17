"""RNGStateCheckpoint: the global RNGs and the last metrics survive a checkpoint round trip."""

from __future__ import annotations

import io
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.rng_state import RNGStateCheckpoint, scalar_metrics


def _draw() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def test_global_streams_replay_through_a_weights_only_round_trip():
    L.seed_everything(3, verbose=False)
    _draw()
    buf = io.BytesIO()
    torch.save(RNGStateCheckpoint().state_dict(), buf)
    expected = [_draw() for _ in range(3)]

    L.seed_everything(99, verbose=False)  # a new process: other seeds
    buf.seek(0)
    RNGStateCheckpoint().load_state_dict(torch.load(buf, weights_only=True))
    assert [_draw() for _ in range(3)] == expected


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_metric", float(self.current_epoch) + 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, ckpt_path=None) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(
                dirpath=tmp_path / "checkpoints",
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
                save_on_train_epoch_end=True,
            ),
            RNGStateCheckpoint(),
        ],
    )
    data = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer.fit(Tiny(), train_dataloaders=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_a_resume_with_no_step_left_reports_the_last_metrics(tmp_path):
    """Killed after the final epoch's checkpoint but before the stage wrote DONE: the rerun
    resumes at the end, trains nothing, and must still report the finished run's metrics."""
    done = _fit(tmp_path)
    want = scalar_metrics(done.callback_metrics)
    assert set(want) == {"train/loss", "train/epoch_metric"}

    resumed = _fit(tmp_path, ckpt_path=str(tmp_path / "checkpoints/last.ckpt"))
    assert resumed.global_step == done.global_step  # nothing trained
    assert {k: float(v) for k, v in resumed.callback_metrics.items()} == want


def test_scalar_metrics_keeps_one_number_entries():
    metrics = {"a": torch.tensor(0.25), "b": torch.ones(2), "c": 3, "d": True, "e": "x"}
    assert scalar_metrics(metrics) == {"a": 0.25, "c": 3.0}
