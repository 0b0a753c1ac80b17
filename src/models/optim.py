"""Optimiser pieces shared by the stage modules: parameter groups and the poly schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def sgd_param_groups(
    backbone: Iterable[nn.Parameter],
    head: Iterable[nn.Parameter],
    *,
    lr: float,
    head_lr_mult: float,
    weight_decay: float,
    head_no_decay: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """Backbone at `lr`, freshly initialised head at `lr * head_lr_mult` (IRNet's 10x);
    `head_no_decay`: head parameters the loss is scale-invariant in (weight decay would only
    shrink them until their effective step size blows up), at the head lr without decay."""
    groups = [
        {"params": list(backbone), "lr": lr, "weight_decay": weight_decay},
        {"params": list(head), "lr": lr * head_lr_mult, "weight_decay": weight_decay},
        {"params": list(head_no_decay), "lr": lr * head_lr_mult, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def poly_lambda(total_steps: int, power: float, every: int = 1) -> Callable[[int], float]:
    """lr multiplier (1 - step/total)^power, recomputed every `every` steps (IRNet: every step;
    deeplab-pytorch: every 10, the lr held in between)."""

    def factor(step: int) -> float:
        step -= step % every
        return max(0.0, 1.0 - step / total_steps) ** power

    return factor


def effective_momentum(momentum: float, irnet_momentum_quirk: bool) -> float:
    """IRNet's PolyOptimizer hands (lr, weight_decay) positionally to SGD, so its momentum is
    really 1e-4 (SEAM #21, psa #28); the quirk flag reproduces that."""
    return 1e-4 if irnet_momentum_quirk else momentum


def poly_sgd(
    groups: list[dict],
    *,
    lr: float,
    momentum: float,
    total_steps: int,
    power: float,
    every: int = 1,
):
    """SGD with a poly schedule stepped per batch, as a Lightning `configure_optimizers` value."""
    if every < 1:
        raise ValueError(f"poly lr update interval must be >= 1, got {every}")
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lambda(max(1, total_steps), power, every)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
