"""Stop a training stage at the first non-finite loss, naming the stage and the step.

A NaN loss does not stop Lightning: the fit runs its budget on NaN weights and the stage would
be marked done, its NaN model scored downstream as if it were a result. Lightning's own guards
do not fit: `detect_anomaly` slows every step, and `EarlyStopping(check_finite=True)` checks a
logged metric only at epoch or validation ends, and stops (a finished fit) instead of failing.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from src.utils.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """A training loss became NaN or infinite; the stage is not marked done."""


class FiniteLoss(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach().float().mean())
        if math.isfinite(value):
            return
        stage = Path(trainer.default_root_dir)
        raise NonFiniteLossError(
            f"{stage.parent.name}/{stage.name}: the training loss is {value} at optimizer step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}); the stage "
            f"stops and is not marked done ({stage}). Fix: lower the learning rate, or check "
            "the starting weights (random init through frozen BatchNorm diverges) and the inputs."
        )
