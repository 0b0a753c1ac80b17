"""Save the global random number generators and the last metrics in every checkpoint; restore
them on resume, so a resumed stage replays the uninterrupted run and reports its metrics.

Lightning's checkpoint restores the model, optimizer, scheduler and loop state, but no RNG. This
callback adds the global ones (python `random`, numpy, torch CPU and CUDA): dropout, random
initialisations, anything drawing from `torch.rand` in the main process.

The training data needs nothing here: every training loader (src/datamodules/datamodule.py
`training_loader`) derives its order and each sample's augmentation seed from (stage seed, epoch,
index), and the epoch comes back with Lightning's loop state. So the resume is exact whatever
`num_workers`, persistent or not.

Exact for checkpoints taken at an epoch boundary (ModelCheckpoint at the end of a training
epoch, as conf/callbacks/default.yaml sets). A mid-epoch checkpoint would also need the position
inside the DataLoader's iterator. Generators held by the LightningModule itself are not saved.

Metrics: `trainer.callback_metrics` (as plain floats) are saved too and put back when training
starts (later values overwrite them, as in an uninterrupted run where they accumulate), or, if
the resumed fit has no step left to run (killed after the last checkpoint but before the stage
ended), when the fit ends: the stage then reports the metrics of the uninterrupted run.

The states are kept per rank (gathered at save, each rank takes its own at load), so a DDP run
resumes each rank's stream; a checkpoint saved with another world size restores rank 0's state
on every rank, with a warning. Everything is stored as tensors and plain Python values, so the
checkpoint still loads with `weights_only=True`.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from src.datamodules.datamodule import SampleSeedSampler

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to_safe(value: Any) -> Any:
    """numpy arrays inside an RNG state as tensors (+ dtype), for weights_only loading."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.astype(np.int64)), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {k: _to_safe(v) for k, v in value.items()}
    return value


def _from_safe(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy().astype(value["dtype"])
        return {k: _from_safe(v) for k, v in value.items()}
    return value


def _python_state(state: tuple) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def capture_global_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _to_safe(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has CUDA RNG states of %d devices, this machine %d: CUDA RNG not "
                "restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def scalar_metrics(metrics: Any) -> dict[str, float]:
    """The one-number entries of `trainer.callback_metrics`, as Python floats."""
    out: dict[str, float] = {}
    for key, value in dict(metrics).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float | np.number) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


class RNGStateCheckpoint(L.Callback):
    """Puts the global RNG states and the callback metrics into every checkpoint and sets them
    back when training resumes.

    Lightning calls `state_dict` while it builds a checkpoint (on every rank, inside
    `Trainer.save_checkpoint`) and `load_state_dict` while it restores one. The RNGs are set
    there, before the resumed epoch's DataLoader iterator starts (the sanity check runs under
    `isolate_rng`). The metrics wait for `on_train_start` / `on_fit_end`, since Lightning clears
    `callback_metrics` after loading the checkpoint.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending_metrics: dict[str, float] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        metrics = {} if self._trainer is None else scalar_metrics(self._trainer.callback_metrics)
        state = {"global": capture_global_rng_state(), "metrics": metrics}
        _, world = _world()
        if world == 1:
            return {"ranks": [state]}
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state)  # every rank is inside save_checkpoint here
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["ranks"]
        rank, world = _world()
        if len(states) != world:
            log.warning(
                "checkpoint RNG states are from %d ranks, this run has %d: every rank restores "
                "rank 0's (the resume is not bit-for-bit)",
                len(states),
                world,
            )
            rank = 0
        restore_global_rng_state(states[rank]["global"])
        self._pending_metrics = dict(states[rank].get("metrics") or {})

    def _restore_metrics(self, trainer: L.Trainer) -> None:
        if not self._pending_metrics:
            return
        saved, self._pending_metrics = self._pending_metrics, None
        current = trainer.callback_metrics  # the logger connector's dict itself
        for key, value in saved.items():
            current.setdefault(key, torch.tensor(value, dtype=torch.float64))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own set_epoch (before this hook) is one ahead when a fit resumes from a
        # checkpoint taken at an epoch end under max_steps (train_segmenter): the resumed epoch
        # then replayed the next epoch's order and crops (found by bench/faults.py). The epoch
        # the loop is in is what a training loader (its per-sample seeds) must draw from.
        for loader in _loaders(trainer.train_dataloader):
            for sampler in (getattr(loader, "sampler", None), _batch_sampler_sampler(loader)):
                if isinstance(sampler, SampleSeedSampler):
                    sampler.set_epoch(trainer.current_epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_metrics(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume with nothing left to train skips on_train_start.
        self._restore_metrics(trainer)


def _loaders(node: Any) -> list:
    """The DataLoaders of a (possibly nested) train_dataloader value."""
    if isinstance(node, dict):
        return [x for v in node.values() for x in _loaders(v)]
    if isinstance(node, list | tuple):
        return [x for v in node for x in _loaders(v)]
    return [] if node is None else [node]


def _batch_sampler_sampler(loader: Any) -> Any:
    return getattr(getattr(loader, "batch_sampler", None), "sampler", None)
