"""Optimiser pieces shared by the stage modules: parameter groups and the poly schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def sgd_param_groups(
    backbone: Iterable[nn.Parameter],
    head: Iterable[nn.Parameter],
    *,
    lr: float,
    head_lr_mult: float,
    weight_decay: float,
) -> list[dict]:
    """Backbone at `lr`, freshly initialised head at `lr * head_lr_mult` (IRNet's 10x)."""
    groups = [
        {"params": list(backbone), "lr": lr, "weight_decay": weight_decay},
        {"params": list(head), "lr": lr * head_lr_mult, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def poly_lambda(total_steps: int, power: float) -> Callable[[int], float]:
    """lr multiplier (1 - step/total)^power, recomputed every step (IRNet's PolyOptimizer)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / total_steps) ** power

    return factor
