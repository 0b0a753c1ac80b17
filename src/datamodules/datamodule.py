"""From a ``data`` config to datasets and DataLoaders: the factory and the LightningDataModule.

Stages pick the splits (``train_split``/``val_split``/``predict_split``); the data config only
says where each split lives (see conf/data/*.yaml).

Every training loader comes from ``training_loader``: its sampler (``SampleSeedSampler``) shuffles
and pairs each index with the seed of that sample's augmentation, both a function of (base seed,
epoch, index) computed in the main process; ``SampleSeedDataset`` applies the seed. A sample's
augmentation therefore does not depend on the number of workers, on persistent workers, on the
DDP split or on a resume (Lightning restores the epoch and calls ``set_epoch``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from src.datamodules.coco import COCOSegmentation, prepare_coco
from src.datamodules.synthetic import ensure_synthetic_voc
from src.datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    sample_seed,
    train_transform,
    val_transform,
)
from src.datamodules.validation import DatasetError
from src.datamodules.voc import ExtraLoader, SegmentationDataset, Transform, VOCSegmentation

FORMATS = ("voc", "coco")


@dataclass(frozen=True)
class ExtraTarget:
    """A per-pixel array that rides along with each image, e.g. CONTA's context map M.

    ``load(image_id, (H, W))`` returns an HxW or HxWxC array at the image's original size;
    ``kind`` says how the geometry treats it: "float" (bilinear, pad 0) or "label" (nearest,
    pad 255)."""

    kind: Literal["float", "label"]
    load: ExtraLoader


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _required(cfg: Any, key: str, where: str) -> Any:
    value = _get(cfg, key)
    if value is None:
        raise DatasetError(f"{where}.{key} is not set. Fix: set it in conf/data/ or on the CLI.")
    return value


def configured_splits(data_cfg: Any) -> list[str]:
    return list((_get(data_cfg, "splits") or {}).keys())


def prepare_data(data_cfg: Any) -> None:
    """One-off data work, on one process before any rank builds a data set: generate the
    synthetic set (``data.name == synth``); index each COCO split's annotation json (parsing
    it once, so ranks and workers never hold it); nothing for VOC on disk."""
    if _get(data_cfg, "name") == "synth":
        gen = dict(_get(data_cfg, "generator") or {})
        ensure_synthetic_voc(_required(data_cfg, "root", "data"), **gen)
    if _get(data_cfg, "format", "voc") == "coco":
        root = Path(str(_required(data_cfg, "root", "data")))
        cache_dir = _required(data_cfg, "cache_dir", "data")
        splits = _get(data_cfg, "splits") or {}
        used = {_get(data_cfg, k) for k in ("train_split", "eval_split", "val_split")}
        for name in sorted(n for n in used if n in splits):
            spec = splits[name]
            prepare_coco(
                root / str(_required(spec, "annotations", f"data.splits.{name}")), cache_dir
            )


def build_dataset(
    data_cfg: Any,
    split: str,
    transform: Transform | None = None,
    *,
    extras: Mapping[str, ExtraLoader] | None = None,
    validate: bool = True,
) -> SegmentationDataset:
    """The reader for ``split`` of the data set described by ``data_cfg`` (a DictConfig)."""
    splits = _get(data_cfg, "splits") or {}
    if split not in splits:
        raise DatasetError(
            f"split {split!r} is not configured for data set {_get(data_cfg, 'name')!r}; the "
            f"configured splits are {configured_splits(data_cfg)}. Fix: use one of them or add "
            f"data.splits.{split}."
        )
    if _get(data_cfg, "name") == "synth":
        prepare_data(data_cfg)  # cheap when present; makes stage functions self-sufficient
    spec = splits[split]
    where = f"data.splits.{split}"
    fmt = _get(data_cfg, "format", "voc")
    common = {
        "transform": transform,
        "on_empty_label": _get(data_cfg, "on_empty_label", "error"),
        "validate": validate,
        "extras": extras,
        "context_dir": _get(spec, "context"),
    }
    root = _required(data_cfg, "root", "data")
    cache_dir = _get(data_cfg, "cache_dir")
    if fmt == "voc":
        class_names = _required(data_cfg, "class_names", "data")
        num_classes = _get(data_cfg, "num_classes")
        if num_classes is not None and int(num_classes) != len(class_names):
            raise DatasetError(
                f"data.num_classes={num_classes} but data.class_names lists {len(class_names)} "
                "names (background included). Fix: make them agree."
            )
        ds: SegmentationDataset = VOCSegmentation(
            root,
            _required(spec, "list", where),
            _required(spec, "masks", where),
            list(class_names),
            image_dir=_get(spec, "images", "JPEGImages"),
            cache_dir=cache_dir,
            **common,
        )
    elif fmt == "coco":
        ds = COCOSegmentation(
            root,
            _required(spec, "images", where),
            _required(spec, "annotations", where),
            cache_dir=cache_dir,
            **common,
        )
        num_classes = _get(data_cfg, "num_classes")
        if num_classes is not None and int(num_classes) != ds.num_classes:
            raise DatasetError(
                f"data.num_classes={num_classes} but {ds.ann_path} defines {ds.num_classes - 1} "
                f"categories (+ background = {ds.num_classes}). Fix: set data.num_classes="
                f"{ds.num_classes}."
            )
    else:
        raise DatasetError(f"data.format={fmt!r} is not one of {FORMATS}.")
    max_images = _get(data_cfg, "max_images")
    if max_images is not None:  # a preflight: the first images of every split (after the policy)
        ds.keep_first(int(max_images))
    return ds


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed (the
    transforms reseed themselves; this covers other code drawing from the global RNGs)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _seed_words(*words: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleSeedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for every index of ``range(num_samples)``, shuffled (in
    order with ``shuffle=False``): the order a function of ``(seed, epoch)``, each index's
    augmentation seed a function of ``(seed, epoch, index)``.

    ``seed`` defaults to ``torch.initial_seed()`` when built, i.e. the stage seed set by
    ``seed_everything``, the same on every rank. Each pass advances the epoch by one;
    ``set_epoch`` sets it (Lightning calls it before every training epoch, with the restored
    epoch on resume, also through DDP's ``DistributedSamplerWrapper``). Nothing is drawn from the
    global RNGs, so every rank builds the same list and ``DistributedSamplerWrapper`` hands each
    rank a disjoint share of it.
    """

    def __init__(self, num_samples: int, *, seed: int | None = None, shuffle: bool = True):
        self.num_samples = int(num_samples)
        self.seed = int(torch.initial_seed() if seed is None else seed) % 2**63
        self.shuffle = shuffle
        self.epoch = 0  # of the next pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            gen = torch.Generator().manual_seed(_seed_words(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        # One 32-bit word per index (albumentations takes 32-bit seeds), from the epoch's seed.
        words = np.random.SeedSequence([self.seed, epoch]).generate_state(self.num_samples)
        return iter([(i, int(words[i])) for i in order])


class SampleSeedDataset(Dataset):
    """Takes the ``(index, sample_seed)`` items of ``SampleSeedSampler``: loads ``dataset[index]``
    with every transform inside reseeded from ``sample_seed`` (``transforms.sample_seed``);
    a plain index loads without reseeding. Other attributes are the wrapped data set's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            index, seed = item
            with sample_seed(seed):
                return self.dataset[index]
        return self.dataset[item]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "dataset" not in self.__dict__:
            # dunders (pickle's __setstate__, DataLoader's __getitems__) are not forwarded
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


class _DeferredIterator:
    """Creates the DataLoader's iterator at the first ``next``, not at ``iter``."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = loader
        self._iterator: Iterator | None = None

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self._loader)
        return next(self._iterator)

    def __len__(self) -> int:
        return len(self._loader)


class SeededLoader(DataLoader):
    """A DataLoader that draws from its sampler only when the first batch is asked for.

    Lightning creates the training iterator of a fit's first epoch before it calls the sampler's
    ``set_epoch``, and a DataLoader with workers draws its first indices when its iterator is
    created: a resumed fit would replay epoch 0's order and crops (so would a DistributedSampler
    with workers). Deferring the iterator to the first ``next`` lets ``set_epoch`` land first.
    """

    def __iter__(self) -> Any:  # type: ignore[override]
        return _DeferredIterator(self)


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator, for the workers' base seed it draws whenever it creates an
    iterator: with persistent workers that is once per process (not per epoch), so drawing from
    the global RNG would shift its stream between a resumed and an uninterrupted run."""
    return torch.Generator().manual_seed(int(seed))


def worker_context(num_workers: int) -> str | None:
    """The DataLoader workers' start method, stated instead of inherited. A job of
    `hydra/launcher=joblib` runs in a loky process, whose inherited default makes loky processes
    that DataLoader workers cannot be (AttributeError: 'Process' object has no attribute 'env',
    pytorch#44687). Linux: fork, its own default; elsewhere the platform's."""
    return "fork" if num_workers > 0 and sys.platform.startswith("linux") else None


def inference_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """The DataLoader of every prediction pass over a stage's images, in order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        multiprocessing_context=worker_context(num_workers),
    )


def training_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    *,
    collate_fn: Callable[[list], Any] | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    seed: int | None = None,
) -> DataLoader:
    """The DataLoader of every training stage: shuffled by a ``SampleSeedSampler``, each sample
    augmented from its own seed (``SampleSeedDataset``), persistent workers when ``num_workers``."""
    sampler = SampleSeedSampler(len(dataset), seed=seed)  # type: ignore[arg-type]
    return SeededLoader(
        SampleSeedDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
        worker_init_fn=seed_worker,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        generator=_own_generator(sampler.seed),
    )


def collate_same_size(batch: Sequence[dict]) -> dict:
    """default_collate, but a batch of images of different sizes fails with a clear fix."""
    sizes = {tuple(s["image"].shape[-2:]) for s in batch}
    if len(sizes) > 1:
        ids = [s["id"] for s in batch]
        raise DatasetError(
            f"cannot batch full images of different sizes {sorted(sizes)} (ids {ids}). "
            "Fix: set predict_batch_size=1 (full-image inference) or use a cropping transform."
        )
    return default_collate(list(batch))


class WSSSDataModule(L.LightningDataModule):
    """Train / val / predict loaders over the splits a stage asks for.

    * train: random rescale + flip + crop (``train_transform``), shuffled, ``drop_last``;
    * val: IRNet's top-left ``crop_size`` crop so batches collate (``val_transform``);
    * predict: full images (``eval_transform``), ``predict_batch_size`` (1 for mixed sizes).
    ``extra_train_targets`` / ``extra_eval_targets`` map a sample key to an ``ExtraTarget``
    (e.g. ``{"frame": ExtraTarget("float", load_frame)}`` for CONTA); ``wrap`` wraps every
    data set built (e.g. ``ContextMaskDataset`` adding each image's context mask).
    """

    def __init__(
        self,
        data_cfg: Any,
        *,
        train_split: str,
        val_split: str | None = None,
        predict_split: str | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        crop_size: int = 512,
        scale_range: tuple[float, float] | None = (0.5, 1.5),
        resize_long: tuple[int, int] | None = None,
        color_jitter: tuple[float, float, float, float] | None = None,
        predict_batch_size: int = 1,
        extra_train_targets: Mapping[str, ExtraTarget] | None = None,
        extra_eval_targets: Mapping[str, ExtraTarget] | None = None,
        wrap: Callable[[SegmentationDataset], SegmentationDataset] | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.train_split = train_split
        self.val_split = val_split
        self.predict_split = predict_split
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.crop_size = int(crop_size)
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.resize_long = tuple(resize_long) if resize_long is not None else None
        self.color_jitter = tuple(color_jitter) if color_jitter is not None else None
        self.predict_batch_size = int(predict_batch_size)
        self.extra_train_targets = dict(extra_train_targets or {})
        self.extra_eval_targets = dict(extra_eval_targets or {})
        self.wrap = wrap
        self.pin_memory = pin_memory
        self.mean = tuple(_get(data_cfg, "mean", IMAGENET_MEAN))
        self.std = tuple(_get(data_cfg, "std", IMAGENET_STD))
        self.train_set: SegmentationDataset | None = None
        self.val_set: SegmentationDataset | None = None
        self.predict_set: SegmentationDataset | None = None

    @property
    def class_names(self) -> list[str]:
        for ds in (self.train_set, self.val_set, self.predict_set):
            if ds is not None:
                return list(ds.class_names)
        names = _get(self.data_cfg, "class_names")
        if names is None:  # COCO format: the names come from the annotation file
            raise DatasetError("class names are read from the annotations: call setup() first")
        return list(names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): generation happens once.
        prepare_data(self.data_cfg)

    def _build(
        self, split: str, transform: Transform, extras: Mapping[str, ExtraTarget]
    ) -> SegmentationDataset:
        loaders = {name: e.load for name, e in extras.items()}
        dataset = build_dataset(self.data_cfg, split, transform, extras=loaders)
        return dataset if self.wrap is None else self.wrap(dataset)

    def _kinds(self, extras: Mapping[str, ExtraTarget]) -> dict[str, str]:
        return {name: e.kind for name, e in extras.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            t = train_transform(
                self.crop_size,
                self.scale_range,
                self.mean,
                self.std,
                resize_long=self.resize_long,
                color_jitter=self.color_jitter,
                extra_targets=self._kinds(self.extra_train_targets),
            )
            self.train_set = self._build(self.train_split, t, self.extra_train_targets)
            if len(self.train_set) < self.batch_size:
                raise DatasetError(
                    f"train split {self.train_split!r} has {len(self.train_set)} images, fewer "
                    f"than batch_size={self.batch_size}, so drop_last leaves no batch. Fix: "
                    "lower the batch size."
                )
        if self.val_split and self.val_set is None and stage in (None, "fit", "validate"):
            t = val_transform(
                self.crop_size, self.mean, self.std, self._kinds(self.extra_eval_targets)
            )
            self.val_set = self._build(self.val_split, t, self.extra_eval_targets)
        if self.predict_split and self.predict_set is None and stage in (None, "predict"):
            t = eval_transform(self.mean, self.std, self._kinds(self.extra_eval_targets))
            self.predict_set = self._build(self.predict_split, t, self.extra_eval_targets)

    def _loader(self, dataset: SegmentationDataset | None, what: str, **kwargs) -> DataLoader:
        if dataset is None:
            raise DatasetError(
                f"no {what} data set: pass {what}_split=... to WSSSDataModule and call setup()"
            )
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_context(self.num_workers),
            worker_init_fn=seed_worker,
            pin_memory=self.pin_memory,
            generator=_own_generator(torch.initial_seed()),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise DatasetError(
                "no train data set: pass train_split=... to WSSSDataModule and call setup()"
            )
        return training_loader(
            self.train_set, self.batch_size, self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_split:
            return []  # Lightning then skips validation (stages without a val split)
        return self._loader(self.val_set, "val", batch_size=self.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            self.predict_set,
            "predict",
            batch_size=self.predict_batch_size,
            shuffle=False,
            collate_fn=collate_same_size,
        )


__all__ = [
    "ExtraTarget",
    "SampleSeedDataset",
    "SeededLoader",
    "SampleSeedSampler",
    "WSSSDataModule",
    "build_dataset",
    "collate_same_size",
    "configured_splits",
    "prepare_data",
    "seed_worker",
    "training_loader",
]
