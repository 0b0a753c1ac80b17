"""Training loaders whose augmentation is a function of (seed, epoch, sample index): the same
crops whatever the number of workers, persistent or not, and a disjoint share per DDP rank."""

from __future__ import annotations

import pickle

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from src.datamodules import WSSSDataModule, build_dataset, train_transform
from src.datamodules.datamodule import SampleSeedDataset, SampleSeedSampler, training_loader

from .conftest import TINY

CROP = 40


def _epochs(dm: WSSSDataModule, epochs: int) -> list[list[dict]]:
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does
        out.append(list(loader))
    return out


def _datamodule(cfg, workers: int) -> WSSSDataModule:
    dm = WSSSDataModule(cfg, train_split="train", batch_size=4, num_workers=workers, crop_size=CROP)
    dm.setup("fit")
    return dm


def test_augmentation_does_not_depend_on_the_workers(synth_cfg):
    torch.manual_seed(5)  # the stage seed the sampler takes (torch.initial_seed())
    single = _epochs(_datamodule(synth_cfg, 0), 2)
    torch.manual_seed(5)
    dm = _datamodule(synth_cfg, 2)
    assert dm.train_dataloader().persistent_workers
    workers = _epochs(dm, 2)
    assert len(single[0]) == len(workers[0]) == TINY["num_train"] // 4  # drop_last kept
    for a_epoch, b_epoch in zip(single, workers, strict=True):
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert a["id"] == b["id"]
            for key in ("image", "mask", "context"):
                assert torch.equal(a[key], b[key]), key
    # Another epoch: another order and other crops.
    assert [b["id"] for b in single[0]] != [b["id"] for b in single[1]]


def test_a_sample_s_crop_is_a_function_of_its_seed_alone(synth_cfg):
    ds = SampleSeedDataset(build_dataset(synth_cfg, "train", train_transform(24, seed=0)))
    first = ds[(3, 1234)]["image"]
    ds[(5, 99)], ds[(3, 7)]  # other samples in between (a worker's history)
    assert torch.equal(ds[(3, 1234)]["image"], first)
    assert not torch.equal(ds[(3, 1235)]["image"], first)
    assert ds.ids == ds.dataset.ids  # attributes pass through
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets
    assert torch.equal(clone[(3, 1234)]["image"], first)


def test_the_sampler_replays_an_epoch_from_its_number():
    sampler = SampleSeedSampler(10, seed=3)
    epoch0, epoch1 = list(sampler), list(sampler)  # without set_epoch: one epoch per pass
    assert sorted(i for i, _ in epoch0) == list(range(10))
    assert epoch0 != epoch1
    torch.manual_seed(123)  # the global RNG plays no part
    resumed = SampleSeedSampler(10, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    assert list(SampleSeedSampler(10, seed=4)) != epoch0


def test_ddp_ranks_get_disjoint_shares_of_the_same_pairs():
    """Lightning wraps a custom sampler in DistributedSamplerWrapper, which materialises the
    sampler's items on every rank and hands rank r its share: tuples pass through, and every
    rank's sampler (same stage seed, whatever its global RNG) builds the same list."""
    n, world = 24, 2
    single = dict(SampleSeedSampler(n, seed=11))
    shares = []
    for rank in range(world):
        torch.manual_seed(rank)  # ranks' global RNGs may differ
        wrapper = DistributedSamplerWrapper(
            SampleSeedSampler(n, seed=11), num_replicas=world, rank=rank, shuffle=True, seed=0
        )
        wrapper.set_epoch(0)
        shares.append(list(wrapper))
    indices = [i for share in shares for i, _ in share]
    assert sorted(indices) == list(range(n))  # disjoint and complete
    assert all(dict(share).items() <= single.items() for share in shares)  # same seeds


def test_training_loader_keeps_the_collate_and_drop_last(synth_cfg):
    ds = build_dataset(synth_cfg, "train", train_transform(24, seed=0))
    loader = training_loader(ds, 5, 0, collate_fn=lambda samples: len(samples))
    assert list(loader) == [5] * (TINY["num_train"] // 5)
    assert len(training_loader(ds, 5, 0, drop_last=False)) == -(-TINY["num_train"] // 5)


def test_set_epoch_after_iter_still_applies(synth_cfg):
    """Lightning creates a fit's first iterator before it calls set_epoch (with the restored
    epoch on resume); a loader with workers draws indices at creation, so it must wait."""
    ds = build_dataset(synth_cfg, "train", train_transform(24, seed=0))
    fresh = training_loader(ds, 4, 0, seed=1)
    fresh.sampler.set_epoch(1)
    want = [b["id"] for b in fresh]
    loader = training_loader(ds, 4, 2, seed=1)
    batches = iter(loader)
    loader.sampler.set_epoch(1)
    assert [b["id"] for b in batches] == want


def _first_batches(workers: int) -> list[int]:
    """In a loky process (a `hydra/launcher=joblib` job): one batch from each loader kind."""
    from torch.utils.data import TensorDataset

    from src.datamodules.datamodule import inference_loader

    data = TensorDataset(torch.arange(8))
    train = training_loader(data, batch_size=4, num_workers=workers, seed=0)
    infer = inference_loader(data, batch_size=4, num_workers=workers)
    return [len(next(iter(train))[0]), len(next(iter(infer))[0])]


def test_loader_workers_start_inside_a_joblib_launcher_job():
    """Loky's inherited start method cannot make DataLoader workers (pytorch#44687): the
    loaders state theirs, so a joblib sweep keeps its `num_workers`."""
    from joblib import Parallel, delayed

    # two jobs so that joblib uses loky processes (one job would run here, in-process)
    out = Parallel(n_jobs=2, backend="loky")(delayed(_first_batches)(w) for w in (1, 2))
    assert out == [[4, 4], [4, 4]]
