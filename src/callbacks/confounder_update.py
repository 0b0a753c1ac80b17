"""CONTA step 4: the previous round's segmenter predicts the training images; this callback turns
the predictions into the next round's confounder set and per-image context masks.

Attach it to ``trainer.predict`` of a ``SegmenterModule`` over the training split. Each image's
full-size prediction is shrunk (nearest, whole-image frame) to the canonical h x w right away and
kept per image id, so a sampler that repeats images (DistributedSampler pads to equal shards)
cannot count one twice. At the end the ranks' dicts are gathered, rank 0 builds ``Confounders``
and writes it atomically; the other ranks write nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch.distributed as dist

from src.models.context import (
    ENCODINGS,
    PRIORS,
    Confounders,
    build_confounders,
    resize_nearest,
)
from src.utils.ranks import run_on_rank_zero

log = logging.getLogger(__name__)


class ConfounderUpdate(L.Callback):
    """Builds ``Confounders`` from a segmenter's ``predict_step`` items ``{"id", "mask"}``.

    num_classes = n foreground classes (ids 1..n in the masks, 0 = background); the batch's
    ``label`` (B, n) multi-hot says which classes each image contains.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        size: Sequence[int] = (32, 32),
        num_classes: int = 20,
        class_names: Sequence[str] | None = None,
        dataset_name: str = "",
        encoding: str = "foreground",
        prior: str = "uniform",
        center_ids: Collection[str] | None = None,
        context: str = "calibrated",
        transform: Callable[[Confounders], Confounders] | None = None,
    ) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r}; choose one of {ENCODINGS}")
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r}; choose one of {PRIORS}")
        if len(size) != 2 or min(int(s) for s in size) <= 0:
            raise ValueError(f"size must be (h, w) > 0, got {size}")
        names = (
            list(class_names)
            if class_names is not None
            else [str(i) for i in range(1, num_classes + 1)]
        )
        if len(names) != num_classes:
            raise ValueError(
                f"{len(names)} class names for {num_classes} foreground classes; pass the "
                "foreground names only (no background)"
            )
        self.out_dir = Path(out_dir)
        self.size = (int(size[0]), int(size[1]))
        self.num_classes = int(num_classes)
        self.class_names = names
        self.dataset_name = dataset_name
        self.encoding = encoding
        self.prior = prior
        self.context = context  # the context variant the file is built for (checked on load)
        # Only these ids (the training split) shape C; other predicted images get just their m.
        self.center_ids = None if center_ids is None else set(center_ids)
        self.result: Confounders | None = None  # set on rank 0 after predict
        # Optional last step before saving (e.g. conta.m_source=shuffled).
        self.transform = transform
        self._reset()

    def _reset(self) -> None:
        self._preds: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.result = None

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, list | tuple) or "label" not in batch:
            raise ValueError(
                "ConfounderUpdate needs predict_step to return a list of {'id', 'mask'} dicts "
                "and the batch to carry 'label' (B, n); use SegmenterModule on a WSSS data set"
            )
        labels = batch["label"]
        if labels.shape[-1] != self.num_classes:
            raise ValueError(
                f"batch['label'] has {labels.shape[-1]} classes, ConfounderUpdate was built "
                f"for {self.num_classes} foreground classes"
            )
        labels = labels.detach().cpu().numpy()
        for i, item in enumerate(outputs):
            image_id = str(item["id"])
            if "id" in batch and str(batch["id"][i]) != image_id:
                raise ValueError(f"prediction {i} is for {image_id}, batch says {batch['id'][i]}")
            if image_id in self._preds:
                continue  # a padding duplicate: same image, same prediction
            small = resize_nearest(np.asarray(item["mask"]), self.size).astype(np.uint8)
            self._preds[image_id] = small
            self._labels[image_id] = (labels[i] > 0.5).astype(np.uint8)

    def _gathered(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._preds, self._labels
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (self._preds, self._labels))
        preds: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for shard_preds, shard_labels in shards:
            for image_id, small in shard_preds.items():
                # An image on two ranks (sampler padding) counts once.
                if image_id not in preds:
                    preds[image_id] = small
                    labels[image_id] = shard_labels[image_id]
        return preds, labels

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preds, labels = self._gathered()
        self._reset()
        # Rank 0 builds and writes; nobody reads the file before it is written, and a failure
        # there ends every rank at once (run_on_rank_zero) rather than leaving them at a barrier.
        self.result = run_on_rank_zero(lambda: self._build(preds, labels), "confounder update")

    def _build(self, preds: dict, labels: dict) -> Confounders:
        if not preds:
            raise ValueError("ConfounderUpdate saw no predictions: the predict split is empty")
        confounders = build_confounders(
            preds,
            labels,
            num_classes=self.num_classes,
            size=self.size,
            class_names=self.class_names,
            dataset=self.dataset_name,
            encoding=self.encoding,  # type: ignore[arg-type]
            prior=self.prior,  # type: ignore[arg-type]
            center_ids=self.center_ids,
            context=self.context,
        )
        if self.transform is not None:
            confounders = self.transform(confounders)
        path = confounders.save(self.out_dir)
        log.info(
            "confounders from %d images at %dx%d -> %s (images per class %s)",
            len(confounders.ids),
            *self.size,
            path,
            confounders.counts.tolist(),
        )
        return confounders
