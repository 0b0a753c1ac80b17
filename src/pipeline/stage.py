"""The contract between the driver and a stage function."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from src.utils.ranks import ranks_settle
from src.utils.untrusted import describe

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """Everything a stage may touch: its config, its own folder and its inputs' folders."""

    cfg: DictConfig
    round: int
    name: str
    dir: Path
    inputs: dict[str, Path]
    seed: int
    loggers: list[Logger] = field(default_factory=list)
    # Folders of the previous round's stages this one reads (CONTA: its confounders); empty in
    # round 0, the plain baseline.
    previous: dict[str, Path] = field(default_factory=dict)
    # The optimizer step the training of this attempt starts from (set by checkpoint_to_resume).
    resumed_from_step: int = field(default=0, init=False)

    def settle(self):
        """Wraps a sharded stage's per-rank work (src/pipeline/sharding.py): every rank leaves
        it together, and a rank failing in it ends them all, its error shown once."""
        return ranks_settle(f"round {self.round}: {self.name}")

    def checkpoint_to_resume(self) -> str | None:
        """Lightning's last.ckpt of an interrupted attempt at this same stage config, if any.

        Checkpoints are taken at the end of a training epoch (conf/callbacks/default.yaml) with
        the global RNG states (src/callbacks/rng_state.py), and the training loaders draw order
        and crops from (stage seed, epoch, index), so the resumed run continues the
        uninterrupted one exactly. Also records the step it starts from (`resumed_from_step`)."""
        self.resumed_from_step = 0
        last = self.dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None
        # torch.save's zip archive ends with its central directory: a file cut short (a copy
        # across file systems killed half-way) lacks it. Start over rather than fail to load.
        if not zipfile.is_zipfile(last):
            log.warning("%s is not a complete checkpoint: training starts over", last)
            last.unlink()
            return None
        # Anything else it may be (another payload, a zip of other files, pickled objects that
        # weights_only refuses) is handled alike: it would fail every rerun the same way.
        try:
            step = _checked_step(torch.load(last, map_location="cpu", mmap=True, weights_only=True))
        except Exception as err:  # any parse failure of the bytes on disk
            log.warning(
                "%s is not a checkpoint of this stage (%s: %s): it is removed and training "
                "starts over",
                last,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            last.unlink()
            return None
        self.resumed_from_step = step
        log.info("%s: resuming from %s (step %d)", self.name, last, self.resumed_from_step)
        return str(last)

    def training_resume(self, trainer: L.Trainer) -> dict[str, int]:
        """For a training stage's DONE.json metrics: the optimizer step this attempt resumed
        from (0 for a fresh start) and the optimizer steps it did itself."""
        return {
            "resumed_from_step": self.resumed_from_step,
            "steps": int(trainer.global_step) - self.resumed_from_step,
        }


def _checked_step(ckpt: object) -> int:
    """The optimizer step of a Lightning checkpoint payload: a dict whose state_dict maps names
    to tensors and whose global_step (default 0) is an int >= 0; else ValueError."""
    # isinstance: Lightning's state_dict is an OrderedDict (weights_only builds nothing else)
    if not isinstance(ckpt, dict):
        raise ValueError(f"the payload is {describe(ckpt)}, not a dict")
    state = ckpt.get("state_dict", {})
    if not isinstance(state, dict) or not all(
        type(k) is str and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError("its state_dict is not a dict of tensors")
    step = ckpt.get("global_step", 0)
    if type(step) is not int or step < 0:
        raise ValueError(f"its global_step is {describe(step)}, not an int >= 0")
    return step


@dataclass
class StageResult:
    """metrics go to DONE.json and the loggers; `results` (if any) into results.json, as
    `{prefix}_{key}` row keys, or as one `prefix` key holding the dict when `nested`."""

    metrics: dict
    artifacts: list[str]
    results: dict | None = None
    prefix: str | None = None
    nested: bool = False


# The shared roles: what a stage's folder holds, for the stages that read it. A stage names the
# roles it reads, never another stage, so a method brings its own producers without touching the
# readers. A method declares the roles only its own stages use in its module (`ROLES`,
# src/methods/); src/pipeline/registry.py joins them with these.
ROLES = {
    "classifier": "the image-level classifier's weights (cam_net.pt)",
    "cams": "CAMs of the training images (cams/<id>.npz: keys, cam at stride 4, high_res)",
    "affinity_labels": "confident fg/bg/unsure labels from the CAMs (<dir>/ir_labels/<id>.png)",
    "pseudo_masks": "pseudo-masks of the training images (masks/<id>.png, 255 = unsure)",
    "segmenter": "the trained segmentation network (segmenter.pt)",
    "segmentation": "the segmenter's val predictions (masks/ and logits/)",
    "confounders": "the confounder set C and its meta (confounders.npz)",
}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageResult]
    config_keys: tuple[str, ...]  # config subtrees whose values change this stage's output
    produces: str | None = None  # the role of its folder, if others read it
    inputs: tuple[str, ...] = ()  # roles of the same round it reads
    optional_inputs: tuple[str, ...] = ()  # roles read when some stage in `stages` produces them
    # From round 1 on (CONTA): roles of the previous round it reads, and config keys that only
    # matter then (so round 0 stays shared between CONTA variants).
    previous_inputs: tuple[str, ...] = ()
    round_keys: tuple[str, ...] = ()
    # A training stage's global batch: its batch-size key, then its accumulation key if any.
    # The driver checks it divides over the ranks before the first stage runs.
    global_batch: tuple[str, ...] = ()
    # False for a stage that only scores its inputs: with `reuse_from` it is computed from the
    # (copied) artifacts, so a donor's scores are never taken on faith (src/pipeline/reuse.py).
    reuse: bool = True
    # For a reusable stage that records scores (results.json values): its record recomputed from
    # its own finished artifacts (those of a copy), on every rank like the stage itself. With
    # `reuse_from` the donor's record is replaced by it; a stage without one is copied only from
    # a donor whose record holds no values (src/pipeline/reuse.py).
    rescore: Callable[[StageContext], StageResult] | None = None
