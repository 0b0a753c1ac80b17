"""A non-finite training loss stops the stage, naming it and the step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.finite_loss import FiniteLoss, NonFiniteLossError


class Diverging(L.LightningModule):
    """Finite for `finite_steps` steps, then NaN."""

    def __init__(self, finite_steps: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.finite_steps = finite_steps

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step >= self.finite_steps else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_first_nan_loss_stops_the_fit_naming_the_stage_and_step(tmp_path):
    stage_dir = tmp_path / "round_0" / "train_segmenter"
    trainer = L.Trainer(
        default_root_dir=str(stage_dir),
        max_epochs=3,
        callbacks=[FiniteLoss()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2)
    with pytest.raises(
        NonFiniteLossError, match=r"round_0/train_segmenter: .* nan at optimizer step 4"
    ):
        trainer.fit(Diverging(finite_steps=3), data)
    assert trainer.global_step == 4  # steps 1..3 finite, the fourth NaN: no fifth


def test_every_training_trainer_guards_its_loss(tmp_path):
    from src.pipeline.trainers import build_trainer
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["callbacks=none"])
    trainer = build_trainer(cfg, tmp_path, [], training=True)
    assert any(isinstance(c, FiniteLoss) for c in trainer.callbacks)
