"""The SEC and DSRG Lightning modules (src/models/seeded_module.py) on a tiny ResNet seeded net:
64 x 64 inputs, an 8 x 8 output grid, 4 classes (background + 3), hand-made cues."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.datamodules.transforms import SegTransform
from src.models.backbone import ResNetBackbone
from src.models.optim import PolyLR, StepDecay, sgd
from src.models.seeded import seeded_net, seeding_loss
from src.models.seeded_module import DSRGModule, SECModule, SeededModule
from src.postprocess.crf import SEC_TRAIN_CRF

NUM_CLASSES = 4
SIZE, GRID = 64, 8
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the ImageNet defaults


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from intra-op threads, and on busy cores 2 threads ran a step
    ~50x slower than 1 (measured: 0.75 s vs 0.015 s per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_resnet() -> ResNetBackbone:
    """conf/backbone/resnet_tiny.yaml: output stride 8."""
    return ResNetBackbone(arch="resnet_tiny", strides=(2, 2, 1, 1), norm="train", frozen_stages=0)


def sec_net(dropout: float = 0.5):
    return seeded_net(
        tiny_resnet(), NUM_CLASSES, head="largefov", hidden=16, dilation=2, dropout=dropout
    )


def dsrg_net():
    return seeded_net(tiny_resnet(), NUM_CLASSES, head="aspp", rates=(1, 2), hidden=16)


def rgb_images() -> np.ndarray:
    """uint8 (2, S, S, 3): a mid-grey ground with a bright square (image 0) and a dark bar
    (image 1), plus noise, so every grey level round-trips through the normalisation."""
    rng = np.random.default_rng(0)
    images = np.full((2, SIZE, SIZE, 3), 110, np.int16)
    images[0, 20:44, 20:44] = (230, 200, 40)
    images[1, 8:56, 36:56] = (20, 60, 200)
    images += rng.integers(-20, 21, images.shape, dtype=np.int16)
    return np.clip(images, 0, 255).astype(np.uint8)


def normalise(images: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """The data pipeline's normalisation (SegTransform) -> (B, 3, S, S)."""
    t = SegTransform(None, mean, std)
    return torch.stack([torch.from_numpy(t.normalize(im)).permute(2, 0, 1) for im in images])


def make_batch() -> dict:
    """Image 0 holds class 2, image 1 classes 1 and 3; foreground cues where the objects are,
    background cues in a 2 x 2 corner."""
    cues = torch.zeros(2, NUM_CLASSES, GRID, GRID, dtype=torch.bool)
    cues[0, 2, 3:5, 3:5] = True
    cues[1, 1, 2:6, 5:7] = True
    cues[1, 3, 6, 1] = True
    cues[:, 0, :2, :2] = True
    return {
        "id": ["a", "b"],
        "image": normalise(rgb_images()),
        "label": torch.tensor([[0.0, 1, 0], [1, 0, 1]]),
        "cues": cues,
    }


def capture_logs(module, monkeypatch) -> dict:
    """What training_step logs, as floats (no trainer needed)."""
    logged: dict[str, float] = {}

    def log_dict(values, **kwargs):
        logged.update({k: float(v.detach()) for k, v in values.items()})

    def log(name, value, **kwargs):
        logged[name] = float(value.detach())

    monkeypatch.setattr(module, "log_dict", log_dict)
    monkeypatch.setattr(module, "log", log)
    return logged


# ------------------------------------------------------------------------------ SEC
def test_sec_training_step_is_seed_plus_expand_plus_constrain(monkeypatch):
    torch.manual_seed(0)
    module = SECModule(sec_net(), NUM_CLASSES, mean=MEAN, std=STD)
    logged = capture_logs(module, monkeypatch)
    loss = module.training_step(make_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    parts = [logged[f"train/{k}"] for k in ("seed", "expand", "constrain")]
    assert all(np.isfinite(parts)) and min(parts) >= 0
    assert parts[0] > 0 and parts[1] > 0  # cues exist; near-uniform probs miss the labels
    assert logged["train/loss"] == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(sum(parts), rel=1e-5)
    # the parts are the losses of the module's own (floored) probabilities
    module.eval()
    batch = make_batch()
    with torch.no_grad():
        probs = module.probs(batch["image"])
        parts = module.losses(batch, probs)
        assert parts["seed"].item() == pytest.approx(seeding_loss(probs, batch["cues"]).item())
    assert probs.min() > 0 and module.crf_params == SEC_TRAIN_CRF


def test_sec_steps_on_a_fixed_batch_reduce_the_seeding_loss(monkeypatch):
    torch.manual_seed(0)
    module = SECModule(sec_net(dropout=0.0), NUM_CLASSES, mean=MEAN, std=STD)
    capture_logs(module, monkeypatch)
    batch = make_batch()
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)

    def seed_loss() -> float:
        with torch.no_grad():
            return seeding_loss(module.probs(batch["image"]), batch["cues"]).item()

    before = seed_loss()
    for _ in range(6):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    after = seed_loss()
    assert np.isfinite(after) and after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------ DSRG
def test_dsrg_losses_are_finite_and_seed_plus_boundary(monkeypatch):
    torch.manual_seed(0)
    module = DSRGModule(dsrg_net(), NUM_CLASSES, mean=MEAN, std=STD)
    logged = capture_logs(module, monkeypatch)
    loss = module.training_step(make_batch(), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert all(np.isfinite(v) for v in logged.values())
    assert loss.item() == pytest.approx(logged["train/seed"] + logged["train/boundary"], rel=1e-5)
    assert logged["train/loss"] == pytest.approx(loss.item())
    assert logged["train/seeded_after"] >= logged["train/seeded_before"] > 0
    assert "train/expand" not in logged  # DSRG has no expansion loss


def test_dsrg_grows_the_cues_where_the_prediction_is_confident(monkeypatch):
    """A net that says background (p > 0.99) everywhere: the background cues grow over every
    cell not cut off by foreground cues, the foreground cues stay."""
    torch.manual_seed(0)
    module = DSRGModule(dsrg_net(), NUM_CLASSES, mean=MEAN, std=STD).eval()
    with torch.no_grad():
        for branch in module.net.head.branches:
            branch[-1].bias[0] = 20.0 / len(module.net.head.branches)
    logged = capture_logs(module, monkeypatch)
    batch = make_batch()
    before = batch["cues"].any(1).float().mean().item()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert logged["train/seeded_before"] == pytest.approx(before)
    assert logged["train/seeded_after"] == pytest.approx(1.0)  # every cell is seeded now
    assert logged["train/seeded_after"] > logged["train/seeded_before"]


@pytest.mark.parametrize("cls", [SECModule, DSRGModule])
def test_cues_on_another_grid_name_make_cues_and_the_input_size(cls):
    module = cls(sec_net() if cls is SECModule else dsrg_net(), NUM_CLASSES)
    batch = make_batch()
    batch["cues"] = torch.zeros(2, NUM_CLASSES, 12, 12, dtype=torch.bool)
    with pytest.raises(
        ValueError,
        match=r"(?s)\(2, 4, 12, 12\).*\(2, 4, 8, 8\).*make_cues.*"
        r"seeded\.input_size",
    ):
        module.training_step(batch, 0)


# ------------------------------------------------------------------------------ shared parts
def test_crf_images_undo_the_modules_normalisation():
    module = SECModule(sec_net(), NUM_CLASSES, mean=MEAN, std=STD)
    images = rgb_images()
    back = module.crf_images(normalise(images))
    assert back.dtype == np.uint8 and back.shape == images.shape
    assert np.abs(back.astype(int) - images).max() <= 1
    # With the default (ImageNet) statistics the same batch comes back wrong: the module's own
    # mean / std are what is used.
    default = SECModule(sec_net(), NUM_CLASSES)
    assert np.abs(default.crf_images(normalise(images)).astype(int) - images).max() > 10


def test_predict_step_keeps_background_and_the_images_classes():
    torch.manual_seed(0)
    module = SECModule(sec_net(), NUM_CLASSES, mean=MEAN, std=STD).eval()
    assert module.mask_classes == "all"  # SEC demo.py / DSRG test-ms.py by default
    module.set_prediction("image")
    batch = make_batch()
    batch["label"] = torch.tensor([[0.0, 1, 0], [1, 0, 1]])
    with torch.no_grad():
        items = module.predict_step(batch, 0)
        softmax = torch.softmax(module.net(batch["image"]), 1)
    assert [item["id"] for item in items] == ["a", "b"]
    assert [item["keys"].tolist() for item in items] == [[0, 2], [0, 1, 3]]
    for i, item in enumerate(items):
        keys, probs = item["keys"], item["probs"]
        assert keys.dtype == np.int16
        assert probs.dtype == np.float16 and probs.shape == (len(keys), GRID, GRID)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
        kept = softmax[i, torch.from_numpy(keys.astype(np.int64))]
        expected = (kept / kept.sum(0, keepdim=True)).numpy()
        np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)
    # an image with no class keeps the background only, with probability 1
    batch["label"] = torch.zeros(2, 3)
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert items[0]["keys"].tolist() == [0] and (items[0]["probs"] == 1).all()


class FixedLogits(torch.nn.Module):
    """A net whose logits are given: (C, h, w) for every image."""

    output_stride = 8

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(images), -1, -1, -1)


def mask_of(item: dict) -> list[int]:
    """The pseudo-mask label per cell before the CRF: the argmax over the written classes."""
    return item["keys"][item["probs"].astype(np.float32).argmax(0)].flatten().tolist()


def test_all_class_argmax_differs_from_the_image_class_restriction():
    """Cell 0: the absent class 3 scores highest, then background, then the image's class 2;
    cell 1: class 2. SEC demo.py / DSRG test-ms.py take the argmax over all classes (3, 2);
    the restriction to the image's classes gives (background, 2)."""
    logits = torch.tensor([[2.0, 0.0], [-20.0, -20.0], [1.0, 5.0], [4.0, 1.0]]).view(4, 1, 2)
    module = SECModule(FixedLogits(logits), NUM_CLASSES).eval()
    batch = {"id": ["a"], "image": torch.zeros(1, 3, 8, 16), "label": torch.tensor([[0.0, 1, 0]])}
    with torch.no_grad():
        everything = module.predict_step(batch, 0)[0]
        restricted = module.set_prediction("image").predict_step(batch, 0)[0]
    assert mask_of(everything) == [3, 2] and mask_of(restricted) == [0, 2]
    # Class 1 (below 1e-5 everywhere, where the test CRF clips anyway) is not written.
    assert everything["keys"].tolist() == [0, 2, 3] and restricted["keys"].tolist() == [0, 2]
    softmax = torch.softmax(logits, 0)
    np.testing.assert_allclose(
        everything["probs"].astype(np.float32), softmax[[0, 2, 3]], atol=1e-3
    )
    with pytest.raises(ValueError, match="seeded.masks.classes='most'"):
        module.set_prediction("most")
    with pytest.raises(ValueError, match="seeded.masks.scales"):
        module.set_prediction("all", [])


def test_multi_scale_logits_are_summed_on_the_grid():
    """DSRG test-ms.py: the image at several square sizes, the logits summed (then softmax)."""
    torch.manual_seed(0)
    module = SECModule(sec_net(dropout=0.0), NUM_CLASSES, mean=MEAN, std=STD).eval()
    images = make_batch()["image"][:, :, :48, :48]  # grid 6 x 6
    net = module.net

    def resized(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        single = module.test_logits(images)
        module.set_prediction("all", [32, 48, 64])
        summed = module.test_logits(images)
        by_hand = sum(resized(net(resized(images, (s, s))), (6, 6)) for s in (32, 48, 64))
        torch.testing.assert_close(single, net(images))
        torch.testing.assert_close(summed, by_hand)
        # An explicit grid: make_seeded_masks feeds the largest scale, the cue grid stays.
        module.set_prediction("all", [32, 48, 64], grid=(4, 4))
        on_grid = module.test_logits(images)
        by_hand = sum(resized(net(resized(images, (s, s))), (4, 4)) for s in (32, 48, 64))
        torch.testing.assert_close(on_grid, by_hand)
        item = module.predict_step({"id": ["a"], "image": images[:1], "label": None}, 0)[0]
    assert item["probs"].shape[1:] == (4, 4)
    np.testing.assert_allclose(item["probs"].astype(np.float32).sum(0), np.ones((4, 4)), atol=2e-3)


def rate(opt, params) -> tuple[float, float]:
    """The one (lr, weight decay) the optimiser gives all of ``params``."""
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    rates = {by_param[id(p)] for p in params}
    assert len(rates) == 1, rates
    return rates.pop()


def named(module, part: str, bias: bool) -> list[torch.nn.Parameter]:
    """The weights (bias=False) or biases of the net's backbone, fc6/fc7 or fc8."""
    net = module.net
    chosen = {
        "backbone": {id(p) for p in net.backbone.parameters()},
        "fc67": {id(p) for p in net.fc67_parameters()},
        "fc8": {id(p) for p in net.fc8_parameters()},
    }[part]
    params = [
        p for n, p in net.named_parameters() if id(p) in chosen and n.endswith("bias") == bias
    ]
    assert params
    return params


# Today's multipliers, kept by the CPU recipes (seeded/base_cpu): the head at 10x, biases as weights.
CPU_MULTS = dict(fc67_lr_mult=10, fc8_lr_mult=10, bias_lr_mult=1, bias_decay_mult=1)


@pytest.mark.parametrize("make_net", [sec_net, dsrg_net])
def test_param_groups_are_caffes_multipliers_of_sec_and_dsrg(make_net):
    """SEC train.prototxt, DSRG train-s.prototxt: conv1..fc7 lr_mult 1 / 2 (weights / biases),
    fc8 10 / 20, every bias decay_mult 0."""
    module = SECModule(make_net(), NUM_CLASSES, optimizer=partial(sgd, lr=0.1, weight_decay=5e-4))
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    expected = {"backbone": 0.1, "fc67": 0.1, "fc8": 1.0}
    for part, lr in expected.items():
        assert rate(opt, named(module, part, bias=False)) == pytest.approx((lr, 5e-4)), part
        assert rate(opt, named(module, part, bias=True)) == pytest.approx((2 * lr, 0.0)), part
    n_fc8 = len(module.net.head.fc8_layers())
    assert n_fc8 == (2 if make_net is dsrg_net else 1) and len(named(module, "fc8", True)) == n_fc8
    # The CPU recipes' multipliers give the two groups of before: backbone 1x, fc6..fc8 10x.
    module = SECModule(
        make_net(), NUM_CLASSES, optimizer=partial(sgd, lr=0.1, weight_decay=5e-4), **CPU_MULTS
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    assert rate(opt, module.net.backbone.parameters()) == pytest.approx((0.1, 5e-4))
    assert rate(opt, module.net.head_parameters()) == pytest.approx((1.0, 5e-4))


def test_step_decay_divides_by_ten_and_the_head_runs_at_its_multiple():
    opt_factory = partial(sgd, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = partial(StepDecay, step_size=3, gamma=0.1)
    module = SECModule(
        sec_net(), NUM_CLASSES, optimizer=opt_factory, scheduler=scheduler, **CPU_MULTS
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    backbone, head = module.net.backbone.parameters, module.net.head_parameters
    assert rate(opt, backbone()) == pytest.approx((0.1, 5e-4))
    assert rate(opt, head()) == pytest.approx((1.0, 5e-4))
    lrs = []
    for _ in range(7):
        opt.step()
        sched.step()
        lrs.append((rate(opt, backbone())[0], rate(opt, head())[0]))
    assert lrs[1] == pytest.approx((0.1, 1.0))  # after 2 steps: unchanged
    assert lrs[2] == pytest.approx((0.01, 0.1))  # after 3: / 10
    assert lrs[5] == pytest.approx((0.001, 0.01))  # after 6: / 100


def test_poly_lr_reaches_zero_at_total_steps():
    module = SECModule(
        sec_net(),
        NUM_CLASSES,
        optimizer=partial(sgd, lr=0.1),
        scheduler=partial(PolyLR, power=0.9),
        total_steps=6,
        **CPU_MULTS,
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=1000)  # total_steps wins
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for step in range(1, 7):
        opt.step()
        sched.step()
        backbone = rate(opt, module.net.backbone.parameters())[0]
        assert backbone == pytest.approx(0.1 * (1 - step / 6) ** 0.9, abs=1e-12)
        assert rate(opt, module.net.head_parameters())[0] == pytest.approx(10 * backbone, abs=1e-12)
    assert backbone == pytest.approx(0.0, abs=1e-12)
    # without total_steps the trainer's estimate sets the horizon
    module = SECModule(sec_net(), NUM_CLASSES, optimizer=partial(sgd, lr=0.1))
    module.trainer = SimpleNamespace(estimated_stepping_batches=4)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("floor", [0.0, 1.0, -1e-4, 1.5])
def test_floor_outside_the_unit_interval_is_rejected(floor):
    with pytest.raises(ValueError, match=rf"floor={floor}"):
        SeededModule(sec_net(), NUM_CLASSES, floor=floor)
    with pytest.raises(ValueError, match="floor"):
        SECModule(sec_net(), NUM_CLASSES, floor=floor)


def test_training_crf_comes_from_the_crf_block():
    block = dict(
        iterations=3,
        gaussian_sxy=0.5,
        gaussian_compat=3,
        bilateral_sxy=5.0,
        bilateral_srgb=13,
        bilateral_compat=10,
    )
    module = DSRGModule(dsrg_net(), NUM_CLASSES, crf=block)
    assert module.crf_params.iterations == 3 and module.crf_params.bilateral_sxy == 5.0
    with pytest.raises(ValueError, match=r"seeded\.module\.crf\.bilateral_sxy=0"):
        SECModule(sec_net(), NUM_CLASSES, crf={**block, "bilateral_sxy": 0})
    with pytest.raises(ValueError, match=r"seeded\.module\.crf\.scale"):
        SECModule(sec_net(), NUM_CLASSES, crf={**block, "scale": 12})
