"""Optimisers and schedules, built from config.

Every training stage's recipe holds an ``optimizer`` and a ``scheduler`` block, each a
``_partial_`` config (the lightning-hydra-template way): the module receives the two factories
and calls them in ``configure_optimizers`` with its own parameter groups. Groups name an
``lr_mult`` relative to the optimiser's ``lr`` (IRNet's 10x head, DeepLab's 10x/20x ASPP), so the
base rate lives in one place, the optimiser config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def sgd(
    params: Iterable,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    irnet_momentum_quirk: bool = False,
) -> torch.optim.SGD:
    """torch SGD. IRNet's, PSA's and SEAM's PolyOptimizer call `SGD(params, lr, weight_decay)`
    (SEAM tool/torchutils.py, irn misc/torchutils.py), so the weight decay lands in SGD's
    third argument, momentum: their momentum equals their weight decay (IRNet 1e-4, SEAM/PSA
    5e-4; SEAM #21, psa #28). ``irnet_momentum_quirk`` reproduces that whatever ``momentum``
    says; the decay itself still applies, set per parameter group as the references do."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=weight_decay if irnet_momentum_quirk else momentum,
        weight_decay=weight_decay,
    )


def poly_lambda(total_steps: int, power: float, every: int = 1) -> Callable[[int], float]:
    """lr multiplier (1 - step/total)^power, recomputed every `every` steps (IRNet: every step;
    deeplab-pytorch: every 10, the lr held in between)."""

    def factor(step: int) -> float:
        step -= step % every
        return max(0.0, 1.0 - step / total_steps) ** power

    return factor


class PolyLR(LambdaLR):
    """The poly schedule of every stage, stepped per optimiser step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9, every: int = 1
    ):
        if every < 1:
            raise ValueError(f"poly lr update interval must be >= 1, got {every}")
        if power < 0:
            raise ValueError(f"poly power must be >= 0, got {power}")
        super().__init__(optimizer, poly_lambda(max(1, int(total_steps)), power, every))


DEFAULT_SCHEDULER: SchedulerFactory = functools.partial(PolyLR, power=0.9)


def lr_groups(
    backbone: Iterable[nn.Parameter],
    head: Iterable[nn.Parameter],
    *,
    head_lr_mult: float,
    head_no_decay: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """Backbone at the base lr, freshly initialised head at ``head_lr_mult`` times it (IRNet's
    10x); `head_no_decay`: head parameters the loss is scale-invariant in (weight decay would only
    shrink them until their effective step size blows up), at the head lr without decay."""
    groups = [
        {"params": list(backbone), "lr_mult": 1.0},
        {"params": list(head), "lr_mult": head_lr_mult},
        {"params": list(head_no_decay), "lr_mult": head_lr_mult, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def optimizer_config(
    groups: list[dict],
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory,
    total_steps: int,
) -> dict:
    """A Lightning `configure_optimizers` value: the optimiser over `groups` (each group's lr =
    the optimiser's lr x its ``lr_mult``, its weight decay x its ``decay_mult`` as Caffe's),
    the scheduler stepped per batch over `total_steps`."""
    opt = optimizer(groups)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        if "weight_decay" in group:
            group["weight_decay"] = group["weight_decay"] * group.get("decay_mult", 1.0)
    sched = scheduler(opt, total_steps=total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def momentum_of(optimizers: list[torch.optim.Optimizer]) -> float | None:
    """The momentum the first optimiser really runs with (recorded in DONE.json: the quirk shows)."""
    if not optimizers:
        return None
    return float(optimizers[0].param_groups[0].get("momentum", 0.0))


class StepDecay(torch.optim.lr_scheduler.StepLR):
    """lr x gamma every `step_size` optimiser steps (SEC: /10 every 2,000; DSRG: x0.33 every
    1,000), with the factory signature of every schedule here (`total_steps` is not needed)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, step_size: int, gamma: float
    ):
        if step_size < 1 or not 0 < gamma <= 1:
            raise ValueError(f"step_size={step_size} must be >= 1 and gamma={gamma} in (0, 1]")
        super().__init__(optimizer, step_size=step_size, gamma=gamma)
