from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.datamodules.transforms import frame_grid
from src.models.backbone import ResNetBackbone
from src.models.cam import (
    CAMClassifier,
    CAMNet,
    ContextInputError,
    keep_and_normalise,
    multiscale_cams,
)
from src.models.context import ContextModule
from src.models.optim import PolyLR, momentum_of, sgd

CTX = (8, 8)  # canonical context size


def tiny_backbone(frozen_stages=0):
    return ResNetBackbone(arch="resnet_tiny", norm="train", frozen_stages=frozen_stages)


def tiny_context(num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Centers of clearly different means, so a change of attention shows in GAP.
    scale = torch.arange(1, num_classes + 1).view(-1, 1, 1) / num_classes
    centers = torch.rand(num_classes, *CTX, generator=g) * scale
    return ContextModule(centers, torch.full((num_classes,), 1 / num_classes))


def tiny_net(num_classes=4, context=False, **kwargs):
    ctx = tiny_context(num_classes) if context else None
    return CAMNet(tiny_backbone(), num_classes=num_classes, context=ctx, **kwargs)


def frames(batch, height, width):
    f = torch.from_numpy(frame_grid(height, width)).permute(2, 0, 1)
    return f[None].repeat(batch, 1, 1, 1)


def context_inputs(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *CTX, generator=g), frames(batch, height, width)


def test_logits_and_cams_shapes():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 80)
    assert net(x).shape == (2, 4)
    assert net.cam(x).shape == (2, 4, 4, 5)
    assert (net.cam(x) >= 0).all()


def test_gap_of_cam_pre_relu_equals_logits():
    # The class conv has no bias, so logits are the spatial mean of the (pre-ReLU) CAMs.
    net = tiny_net().eval()
    x = torch.randn(1, 3, 64, 64)
    pre = torch.nn.functional.conv2d(net.features(x), net.classifier.weight)
    torch.testing.assert_close(pre.mean(dim=(2, 3)), net(x))


def test_round0_net_has_no_context_parts():
    net = tiny_net()
    assert net.context is None and net.post_conv is None
    assert net.classifier.in_channels == net.backbone.out_channels[-1]
    assert not any(k.startswith(("context", "post_conv")) for k in net.state_dict())


def test_context_map_is_concatenated_after_layer4_and_required():
    torch.manual_seed(0)
    net = tiny_net(context=True).eval()
    x = torch.randn(2, 3, 64, 64)
    mask, frame = context_inputs(2, 64, 64)
    assert net.classifier.in_channels == net.backbone.out_channels[-1] + 1
    logits = net(x, mask, frame)
    assert logits.shape == (2, 4)
    with torch.no_grad():  # make M, and the mask's effect on M, large enough to see
        net.classifier.weight[:, -1] = 5.0
        net.context.w1.weight.mul_(10)
        net.context.w2.weight.mul_(10)
    assert (net(x, mask, frame) - net(x, 1 - mask, frame)).abs().max() > 1e-3
    with pytest.raises(ContextInputError, match="context mask"):
        net(x, None, frame)
    with pytest.raises(ContextInputError, match="frame"):
        net(x, mask)
    # CAM = ReLU(W [F; M]) and the logits are its pre-ReLU spatial mean.
    feats = net.features(x, mask, frame)
    pre = torch.nn.functional.conv2d(feats, net.classifier.weight)
    torch.testing.assert_close(pre.mean(dim=(2, 3)), net(x, mask, frame))
    torch.testing.assert_close(net.cam(x, mask, frame), pre.relu())


def test_context_channel_is_m_in_the_input_frame():
    net = tiny_net(context=True).eval()
    x = torch.randn(1, 3, 64, 64)
    mask, frame = context_inputs(1, 64, 64)
    feats = net.features(x, mask, frame)
    m = net.context_map(mask)
    ref = torch.nn.functional.interpolate(m, feats.shape[-2:], mode="bilinear")
    torch.testing.assert_close(feats[:, -1:], ref, atol=1e-5, rtol=0)
    padded = frame.clone()
    padded[..., 32:] = 0  # right half is padding
    assert (net.features(x, mask, padded)[:, -1, :, 2:] == 0).all()


@pytest.mark.parametrize("inject_at", ["layer4_in", "layer3_in"])
def test_injection_inside_the_backbone_keeps_pretrained_behaviour_at_init(inject_at):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    plain = ResNetBackbone(arch="resnet_tiny", norm="train", frozen_stages=0)
    plain.load_state_dict(backbone.state_dict())
    stage = {"layer4_in": 3, "layer3_in": 2}[inject_at]
    in_ch = backbone.out_channels[stage - 1]
    stride = backbone.stages[stage][0].conv1.stride
    net = CAMNet(backbone, 4, context=tiny_context(), inject_at=inject_at).eval()
    block = net.backbone.stages[stage][0]
    assert block.conv1.in_channels == in_ch + 1 and block.downsample[0].in_channels == in_ch + 1
    assert (block.conv1.weight[:, -1] == 0).all() and block.conv1.stride == stride
    assert net.classifier.in_channels == backbone.out_channels[-1]
    x = torch.randn(2, 3, 64, 64)
    mask, frame = context_inputs(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x, mask, frame), plain.eval()(x))
    # The zero-initialised context weights get a gradient at once; W1/W2 (behind them) from the
    # step after.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(x, mask, frame).sum().backward()
        assert block.conv1.weight.grad[:, -1].abs().sum() > 0
        opt.step()
    assert net.context.w1.weight.grad.abs().sum() > 0


def test_injection_into_a_frozen_stage_or_with_a_post_conv_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        CAMNet(tiny_backbone(frozen_stages=3), 4, context=tiny_context(), inject_at="layer3_in")
    with pytest.raises(ValueError, match="only applies to inject_at=layer4_out"):
        tiny_net(context=True, inject_at="layer4_in", post_concat_conv="1x1")
    with pytest.raises(ValueError, match="inject_at"):
        tiny_net(context=True, inject_at="head")


@pytest.mark.parametrize("kind", ["1x1", "3x3"])
def test_post_concat_conv_is_identity_at_init(kind):
    torch.manual_seed(0)
    net = tiny_net(context=True, post_concat_conv=kind).eval()
    channels = net.backbone.out_channels[-1]
    assert net.classifier.in_channels == channels
    x = torch.randn(1, 3, 64, 64)
    mask, frame = context_inputs(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x, mask, frame), net.backbone(x))
    assert net.post_conv[0].weight.shape[1] == channels + 1
    assert set(map(id, net.head_parameters())) >= set(map(id, net.post_conv.parameters()))


def test_multiscale_cams_flip_equivariance():
    net = tiny_net().eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        strided, high = multiscale_cams(net, x, scales=(1.0, 0.5), flip=True)
        strided_f, high_f = multiscale_cams(net, x.flip(-1), scales=(1.0, 0.5), flip=True)
    assert strided.shape == (1, 4, 16, 12) and high.shape == (1, 4, 64, 48)
    torch.testing.assert_close(high, high_f.flip(-1), rtol=1e-4, atol=1e-4)


def test_multiscale_cams_with_context_flip_equivariance():
    net = tiny_net(context=True).eval()
    with torch.no_grad():
        net.classifier.weight[:, -1] = 3.0
    x = torch.randn(2, 3, 64, 48)
    mask, frame = context_inputs(2, 64, 48)
    with torch.no_grad():
        strided, high = multiscale_cams(net, x, (1.0, 0.5), True, mask, frame)
        _, high_f = multiscale_cams(net, x.flip(-1), (1.0, 0.5), True, mask, frame.flip(-1))
        # A frame that ignores the flip changes the result: the flipped copy really uses it.
        _, high_wrong = multiscale_cams(net, x.flip(-1), (1.0, 0.5), True, mask, frame)
    assert strided.shape == (2, 4, 16, 12) and high.shape == (2, 4, 64, 48)
    torch.testing.assert_close(high, high_f.flip(-1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(high, high_wrong.flip(-1), atol=1e-3)


def test_keep_and_normalise_keeps_gt_classes_with_unit_max():
    cams = torch.rand(4, 8, 8) * 5
    kept, keys = keep_and_normalise(cams, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert keys.tolist() == [2, 4]
    assert torch.allclose(kept.flatten(1).amax(1), torch.ones(2), atol=1e-4)


def test_training_step_decreases_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = CAMClassifier(tiny_net())
    batch = {
        "image": torch.randn(4, 3, 64, 64),
        "label": torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]] * 2),
    }
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = module._loss(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def context_batch(batch=4, size=64):
    mask, frame = context_inputs(batch, size, size)
    return {
        "id": [f"i{k}" for k in range(batch)],
        "image": torch.randn(batch, 3, size, size),
        "label": torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]] * (batch // 2)),
        "context_mask": mask,
        "frame": frame,
    }


def test_context_classifier_trains_w1_w2_and_needs_its_batch_keys():
    torch.manual_seed(0)
    module = CAMClassifier(tiny_net(context=True))
    batch = context_batch()
    loss, logits = module._loss(batch)
    loss.backward()
    assert logits.shape == (4, 4)
    assert module.net.context.w1.weight.grad.abs().sum() > 0
    for key in ("context_mask", "frame"):
        partial = {k: v for k, v in batch.items() if k != key}
        with pytest.raises(ContextInputError, match=f"missing \\['{key}'\\].*Fix"):
            module._loss(partial)
    # Round 0 ignores the keys: same logits with or without them.
    plain = CAMClassifier(tiny_net()).eval()
    keys = {k: batch[k] for k in ("image", "label")}
    torch.testing.assert_close(plain._loss(batch)[1], plain._loss(keys)[1])


def test_context_parameters_are_in_the_head_group():
    module = CAMClassifier(tiny_net(context=True), head_lr_mult=10)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    head = next(g for g in groups if g["lr"] == pytest.approx(1.0))
    head_ids = set(map(id, head["params"]))
    for p in [*module.net.context.parameters(), *module.net.classifier.parameters()]:
        assert id(p) in head_ids
    all_ids = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == all_ids


def test_context_net_state_dict_round_trips_the_confounders():
    net = tiny_net(context=True)
    state = net.state_dict()
    assert {"context.confounders", "context.prior", "context.w1.weight"} <= set(state)
    other = tiny_net(context=True)
    other.context.confounders.zero_()
    other.load_state_dict(state)
    torch.testing.assert_close(other.context.confounders, net.context.confounders)


def test_context_predict_step():
    module = CAMClassifier(tiny_net(context=True), scales=(1.0, 0.5), flip=True).eval()
    batch = context_batch(batch=2)
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert items[0]["cam"].shape == (1, 16, 16) and np.isfinite(items[0]["high_res"]).all()
    del batch["frame"]
    with pytest.raises(ContextInputError, match="frame"):
        module.predict_step(batch, 0)


def test_optimizer_and_schedule_come_from_their_factories():
    quirk = partial(sgd, lr=0.2, momentum=0.9, weight_decay=1e-4, irnet_momentum_quirk=True)
    module = CAMClassifier(tiny_net(), optimizer=quirk, scheduler=partial(PolyLR, power=1.0))
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert momentum_of([opt]) == 1e-4  # IRNet's PolyOptimizer quirk, whatever momentum says
    assert [g["lr"] for g in opt.param_groups] == [0.2, pytest.approx(2.0)]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(1.0)]
    assert "optimizer" not in module.hparams  # checkpoints keep plain values only
    real = CAMClassifier(tiny_net(), optimizer=partial(sgd, lr=0.1, momentum=0.9))
    real.trainer = SimpleNamespace(estimated_stepping_batches=10)
    assert momentum_of([real.configure_optimizers()["optimizer"]]) == 0.9


def test_predict_step_writes_float16_cams_for_gt_classes_only():
    module = CAMClassifier(tiny_net(), scales=(1.0,), flip=True).eval()
    batch = {
        "id": ["a", "b"],
        "image": torch.randn(2, 3, 64, 64),
        "label": torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]]),
    }
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0]["keys"].tolist() == [1, 4] and items[1]["keys"].tolist() == [3]
    assert items[0]["cam"].dtype.name == "float16" and items[0]["cam"].shape == (2, 16, 16)
    assert items[1]["high_res"].shape == (1, 64, 64)


@pytest.mark.parametrize("inject_at", ["layer4_out", "layer4_in", "layer3_in"])
def test_a_context_net_with_zero_m_is_bit_identical_to_the_round0_net(inject_at):
    """Common random numbers at the model level: built after the same seed, a context net draws
    the same backbone and class weights as the plain net (its own parameters come from their
    own generator), and with the M channel zeroed (conta.ablate=zero_m) its logits, CAMs and
    gradients equal the plain net's bit for bit."""
    torch.manual_seed(0)
    plain = tiny_net()
    torch.manual_seed(0)
    backbone = tiny_backbone()
    ctx = tiny_context()
    gen = torch.Generator().manual_seed(1)
    net = CAMNet(backbone, 4, context=ctx, inject_at=inject_at, generator=gen, ablate_context=True)
    assert torch.equal(
        net.classifier.weight[:, : plain.classifier.in_channels], plain.classifier.weight
    )
    x = torch.randn(2, 3, 64, 64)
    mask, frame = context_inputs(2, 64, 64)
    a, b = plain(x), net(x, mask, frame)
    assert torch.equal(a, b)
    assert torch.equal(plain.cam(x), net.cam(x, mask, frame))
    a.sum().backward()
    b.sum().backward()
    g_plain = dict(plain.backbone.named_parameters())
    for name, p in net.backbone.named_parameters():
        q = g_plain[name]
        assert torch.equal(p.grad[:, : q.shape[1]] if p.ndim == 4 else p.grad, q.grad), name


def test_split_input_conv_is_the_widened_conv():
    from src.models.cam import SplitInputConv

    torch.manual_seed(0)
    base = torch.nn.Conv2d(8, 5, 3, padding=1, bias=True)
    split = SplitInputConv(base, 1)
    with torch.no_grad():
        split.weight[:, -1].normal_()
    x = torch.randn(2, 9, 7, 7)
    ref = torch.nn.functional.conv2d(x, split.weight, split.bias, padding=1)
    torch.testing.assert_close(split(x), ref)
    assert set(split.state_dict()) == {"weight", "bias"}  # the same checkpoint layout
    zero = torch.cat([x[:, :8], torch.zeros(2, 1, 7, 7)], 1)
    assert torch.equal(split(zero), base(x[:, :8]))


def test_seams_normalisation_subtracts_each_maps_floor():
    """SEAM infer_SEAM.py: (cam - min) / (max - min); IRNet: cam / max. A map with a floor
    (SEAM's PCM output) keeps it under IRNet's rule and loses it under SEAM's."""
    from src.models.cam import keep_and_normalise

    cams = torch.stack([torch.linspace(0.2, 1.0, 16).view(4, 4), torch.zeros(4, 4)])
    label = torch.tensor([1.0, 0.0])
    by_max, keys = keep_and_normalise(cams, label, "max")
    by_min_max, _ = keep_and_normalise(cams, label, "min_max")
    assert keys.tolist() == [1]
    assert by_max.min() == pytest.approx(0.2, abs=1e-4) and by_max.max() == pytest.approx(
        1, abs=1e-4
    )
    assert by_min_max.min() == 0 and by_min_max.max() == pytest.approx(1, abs=1e-4)
    with pytest.raises(ValueError, match="cam.inference.normalise"):
        keep_and_normalise(cams, label, "mean")
