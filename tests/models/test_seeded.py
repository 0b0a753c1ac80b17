import math
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from src.models.backbone import ResNetBackbone, WeightsUnavailableError
from src.models.seeded import (
    ASPPVGGHead,
    LargeFOVHead,
    SeededNet,
    VGG16Backbone,
    constrain_loss,
    crf_targets,
    decimated_fc67,
    expansion_loss,
    floored_softmax,
    gwrp,
    seeded_net,
    seeding_loss,
)
from src.postprocess.crf import SEC_TRAIN_CRF, crf_from_unary

NUM_CLASSES = 3


def tiny_resnet() -> ResNetBackbone:
    """conf/backbone/resnet_tiny.yaml: output stride 8, 256 channels."""
    return ResNetBackbone(arch="resnet_tiny", strides=(2, 2, 1, 1), norm="train", frozen_stages=0)


def probs_2x2(*planes) -> torch.Tensor:
    """(1, C, 2, 2) from per-class lists [p00, p01, p10, p11]."""
    return torch.tensor(planes, dtype=torch.float64).reshape(1, len(planes), 2, 2)


# ------------------------------------------------------------------------------ networks
def test_vgg_backbone_is_deeplab_largefov():
    backbone = VGG16Backbone()
    f = backbone.features
    assert backbone.output_stride == 8 and backbone.out_channels == [512]
    assert [(f[i].kernel_size, f[i].stride, f[i].padding) for i in (4, 9, 16)] == [(3, 2, 1)] * 3
    assert [(f[i].kernel_size, f[i].stride, f[i].padding) for i in (23, 30)] == [(3, 1, 1)] * 2
    assert all(f[i].dilation == (2, 2) and f[i].padding == (2, 2) for i in (24, 26, 28))
    assert f[17].dilation == (1, 1)
    assert isinstance(f[31], nn.AvgPool2d) and (f[31].kernel_size, f[31].stride) == (3, 1)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 65, 65)).shape == (1, 512, 9, 9)
    # Convolutions keep the size, so the pools alone give the grid: SEC's 41x41 for 321 input,
    # and ceil(H/8) for even sizes as with ResNetBackbone.
    pools = nn.Sequential(*(m for m in f if not isinstance(m, nn.Conv2d | nn.ReLU)))
    assert pools(torch.zeros(1, 1, 321, 321)).shape[-2:] == (41, 41)
    assert pools(torch.zeros(1, 1, 64, 48)).shape[-2:] == (8, 6)


@pytest.mark.parametrize("head", ["largefov", "aspp"])
def test_seeded_nets_on_vgg_and_resnet(head):
    torch.manual_seed(0)
    # ceil(H / 8) on both: VGG 33 -> 17 -> 9 -> 5, ResNet 64 -> 32 -> 16 -> 8.
    for backbone, size, grid in ((VGG16Backbone(), 33, 5), (tiny_resnet(), 64, 8)):
        net = seeded_net(backbone, NUM_CLASSES, head=head, hidden=32).eval()
        assert isinstance(net, SeededNet) and net.backbone is backbone
        assert net.output_stride == 8
        with torch.no_grad():
            out = net(torch.randn(2, 3, size, size))
        assert out.shape == (2, NUM_CLASSES, grid, grid)
        head_ids = {id(p) for p in net.head_parameters()}
        assert head_ids == {id(p) for p in net.head.parameters()}
        assert not head_ids & {id(p) for p in backbone.parameters()}
    with pytest.raises(ValueError, match="head='psp'"):
        seeded_net(tiny_resnet(), NUM_CLASSES, head="psp")


def test_largefov_head_layers_and_fc8_init():
    torch.manual_seed(0)
    head = LargeFOVHead(64, 21)
    fc6, fc7, fc8 = (m for m in head if isinstance(m, nn.Conv2d))
    assert fc6.kernel_size == (3, 3) and fc6.out_channels == 1024
    assert fc6.dilation == (12, 12) and fc6.padding == (12, 12)
    assert fc7.kernel_size == (1, 1) and fc8.kernel_size == (1, 1) and head.fc8 is fc8
    assert sum(isinstance(m, nn.Dropout) for m in head) == 2
    assert abs(fc8.weight.std().item() - 0.01) < 0.001 and abs(fc8.weight.mean().item()) < 1e-3
    assert (fc8.bias == 0).all()
    x = torch.randn(1, 64, 10, 10)
    assert head.eval()(x).shape == (1, 21, 10, 10)
    with pytest.raises(ValueError, match="dropout"):
        LargeFOVHead(64, 21, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        LargeFOVHead(64, 0)


def test_aspp_vgg_head_sums_four_largefov_branches():
    torch.manual_seed(0)
    head = ASPPVGGHead(16, NUM_CLASSES, hidden=8).eval()
    fc6s = [branch[0] for branch in head.branches]
    assert [c.dilation[0] for c in fc6s] == [6, 12, 18, 24] == [c.padding[0] for c in fc6s]
    assert all(len(branch) == 7 for branch in head.branches)  # fc6 r d fc7 r d fc8
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(head(x), sum(branch(x) for branch in head.branches))
    assert all((branch[-1].bias == 0).all() for branch in head.branches)
    with pytest.raises(ValueError, match="rates"):
        ASPPVGGHead(16, NUM_CLASSES, rates=())


def torchvision_vgg16_features_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}


def test_vgg_weights_path_loads_torchvision_features(tmp_path):
    state = torchvision_vgg16_features_state()
    path = tmp_path / "vgg16.pth"
    torch.save({**state, "classifier.6.bias": torch.zeros(1000)}, path)
    backbone = VGG16Backbone(weights_path=str(path))
    assert torch.equal(backbone.features[0].weight, state["features.0.weight"])
    assert torch.equal(backbone.features[28].bias, state["features.28.bias"])
    # The net's own state dict has the same keys, so a saved backbone loads back.
    assert set(backbone.state_dict()) == set(state)
    partial = {"state_dict": {"features.0.weight": state["features.0.weight"]}}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsUnavailableError, match=r"miss keys \['features.0.bias'"):
        VGG16Backbone(weights_path=str(tmp_path / "partial.pth"))


def torchvision_fc67(code: str) -> dict[str, torch.Tensor]:
    """torchvision vgg16's classifier.0 (Linear 25088 -> 4096, i.e. 4096 x 512 x 7 x 7) and
    classifier.3 (4096 -> 4096) without their 500 MB: expanded views whose value is the output
    index (code "out") or the input index (code "in"); biases hold their index."""

    def coded(rows: int, cols: int) -> torch.Tensor:
        if code == "out":
            return torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
        return torch.arange(cols, dtype=torch.float32)[None].expand(rows, cols)

    return {
        "classifier.0.weight": coded(4096, 512 * 7 * 7),
        "classifier.0.bias": torch.arange(4096, dtype=torch.float32),
        "classifier.3.weight": coded(4096, 4096),
        "classifier.3.bias": -torch.arange(4096, dtype=torch.float32),
    }


def test_fc67_are_torchvision_fc6_fc7_decimated_as_deeplab_largefov():
    """fc6: every 4th of the 4096 filters, every input channel, taps 0/3/6 of the 7 x 7 (a 3 x 3
    to dilate); fc7: every 4th output and every 4th input; biases every 4th."""
    out = decimated_fc67(torchvision_fc67("out"))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "fc6.weight": (1024, 512, 3, 3),
        "fc6.bias": (1024,),
        "fc7.weight": (1024, 1024, 1, 1),
        "fc7.bias": (1024,),
    }
    every4 = 4 * torch.arange(1024, dtype=torch.float32)
    assert torch.equal(out["fc6.weight"], every4.view(-1, 1, 1, 1).expand(-1, 512, 3, 3))
    assert torch.equal(out["fc7.weight"][:, :, 0, 0], every4[:, None].expand(-1, 1024))
    assert torch.equal(out["fc6.bias"], every4) and torch.equal(out["fc7.bias"], -every4)
    # The input side: torchvision flattens pool5 as (channel, row, column).
    inputs = decimated_fc67(torchvision_fc67("in"))
    c, i, j = torch.meshgrid(torch.arange(512), torch.arange(3), torch.arange(3), indexing="ij")
    flat = (c * 49 + 3 * i * 7 + 3 * j).float()
    assert torch.equal(inputs["fc6.weight"], flat.expand(1024, -1, -1, -1))
    assert torch.equal(inputs["fc7.weight"][:, :, 0, 0], every4[None].expand(1024, -1))


def test_fc67_need_all_four_entries_of_torchvision_shapes():
    state = torchvision_fc67("out")
    assert decimated_fc67({}) is None  # a features-only file: fc6/fc7 start fresh
    with pytest.raises(WeightsUnavailableError, match=r"miss \['classifier.3.bias'\]"):
        decimated_fc67({k: v for k, v in state.items() if k != "classifier.3.bias"})
    with pytest.raises(WeightsUnavailableError, match="shapes"):
        decimated_fc67({**state, "classifier.3.weight": torch.zeros(1000, 4096)})
    # torchvision's IMAGENET1K_FEATURES has no classifier values: fresh fc6/fc7, not NaN ones.
    nan = {**state, "classifier.0.bias": torch.full((4096,), math.nan)}
    assert decimated_fc67(nan) is None


@pytest.mark.parametrize("head", ["largefov", "aspp"])
def test_seeded_net_starts_fc6_fc7_from_the_imagenet_classifier(head, tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save({**torchvision_vgg16_features_state(), **torchvision_fc67("out")}, path)
    backbone = VGG16Backbone(weights_path=str(path))
    fc67 = backbone.imagenet_fc67
    assert fc67 is not None and "imagenet_fc67" not in str(backbone.state_dict().keys())
    torch.manual_seed(0)
    net = seeded_net(backbone, NUM_CLASSES, head=head)
    layers = net.head.fc67_layers()
    assert len(layers) == (4 if head == "aspp" else 1)  # every ASPP branch from the same ones
    for fc6, fc7 in layers:
        for conv, name in ((fc6, "fc6"), (fc7, "fc7")):
            assert torch.equal(conv.weight, fc67[f"{name}.weight"])
            assert torch.equal(conv.bias, fc67[f"{name}.bias"])
        assert fc6.kernel_size == (3, 3) and fc6.dilation == fc6.padding
    # fc8 stays SEC's fresh N(0, 0.01), zero bias; the fc6/fc7/fc8 split covers the head.
    assert all((m.bias == 0).all() for m in net.head.fc8_layers())
    split = {id(p) for p in net.fc67_parameters()} | {id(p) for p in net.fc8_parameters()}
    assert split == {id(p) for p in net.head_parameters()}
    assert not {id(p) for p in net.fc67_parameters()} & {id(p) for p in net.fc8_parameters()}
    with pytest.raises(ValueError, match=r"seeded\.net\.hidden=1024"):
        seeded_net(backbone, NUM_CLASSES, head=head, hidden=32)


def test_random_init_and_features_only_weights_keep_fresh_fc6_fc7(tmp_path):
    path = tmp_path / "features.pth"
    torch.save(torchvision_vgg16_features_state(), path)
    for backbone in (VGG16Backbone(), VGG16Backbone(weights_path=str(path))):
        assert backbone.imagenet_fc67 is None
        torch.manual_seed(0)
        fc6, fc7 = seeded_net(backbone, NUM_CLASSES).head.fc67_layers()[0]
        assert (fc6.bias == 0).all() and (fc7.bias == 0).all()  # Kaiming, zero bias
        assert abs(fc6.weight.std().item() - math.sqrt(2 / (512 * 9))) < 2e-3


def test_vgg_weight_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="nope.pth does not exist.*vgg16"):
        VGG16Backbone(weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="not a torchvision weight of vgg16"):
        VGG16Backbone(weights="IMAGENET_TYPO")

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match=r"(?s)not cached at .*vgg16-"):
        VGG16Backbone(weights="IMAGENET1K_V1")


# ------------------------------------------------------------------------------ losses
def test_floored_softmax():
    logits = torch.tensor([[[[0.0]], [[100.0]]]])
    probs = floored_softmax(logits, floor=1e-4)
    # softmax (0, 1) + 1e-4, renormalised by 1 + 2e-4
    torch.testing.assert_close(probs.flatten(), torch.tensor([1e-4, 1 + 1e-4]) / (1 + 2e-4))
    for floor in (0.0, 1.0):
        with pytest.raises(ValueError, match="floor"):
            floored_softmax(logits, floor)


def test_seeding_loss_by_hand_with_multilabel_pixel_and_empty_image():
    bg = [0.9, 0.2, 0.6, 0.5]
    image0 = probs_2x2(bg, [1 - p for p in bg])
    image1 = probs_2x2([0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0])  # zeros, but no cues
    probs = torch.cat([image0, image1]).requires_grad_()
    cues = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    cues[0, 0, 0, 0] = True  # bg at (0, 0): 0.9
    cues[0, 1, 0, 1] = True  # fg at (0, 1): 0.8
    cues[0, :, 1, 0] = True  # both at (1, 0): 0.6 and 0.4
    loss = seeding_loss(probs, cues)
    by_hand = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.4)) / 4
    assert loss.item() == pytest.approx(by_hand / 2)  # the empty image counts, as 0
    loss.backward()
    assert torch.isfinite(probs.grad).all() and (probs.grad[1] == 0).all()
    assert probs.grad[0, 0, 0, 0].item() == pytest.approx(-1 / (4 * 0.9 * 2))
    with pytest.raises(TypeError, match="cues must be a bool"):
        seeding_loss(probs, cues.float())
    with pytest.raises(ValueError, match="cues must have the shape"):
        seeding_loss(probs, cues[:, :1])


def test_gwrp_by_hand():
    probs = probs_2x2([0.1, 0.7, 0.4, 0.2])
    # sorted 0.7, 0.4, 0.2, 0.1 with weights 1, 1/2, 1/4, 1/8 (sum 1.875)
    expected = (0.7 + 0.4 / 2 + 0.2 / 4 + 0.1 / 8) / 1.875
    assert gwrp(probs, 0.5).item() == pytest.approx(expected)
    assert gwrp(probs, 1.0).item() == pytest.approx(0.35)  # decay 1 = mean
    assert gwrp(probs, 1e-6).item() == pytest.approx(0.7, abs=1e-5)  # -> max
    many = torch.rand(2, 3, 5, 4)
    torch.testing.assert_close(gwrp(many, 1.0), many.mean(dim=(2, 3)))
    for decay in (0.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            gwrp(probs, decay)


def test_expansion_loss_by_hand():
    bg, a, b = [0.5, 0.2, 0.65, 0.1], [0.3, 0.7, 0.2, 0.8], [0.2, 0.1, 0.15, 0.1]
    probs = probs_2x2(bg, a, b).expand(3, -1, -1, -1).clone().requires_grad_()
    # Column 0 says "no background" in image 0: it is treated as present anyway.
    labels = torch.tensor([[0, 1, 0], [1, 0, 0], [1, 1, 1]])
    log_gwrp_a = math.log((0.8 + 0.7 / 2 + 0.3 / 4 + 0.2 / 8) / 1.875)  # d_fg = 0.5
    log_bg = math.log(1.45 / 4)  # d_bg = 1: the mean
    expected = [
        -log_gwrp_a - math.log(1 - 0.2) - log_bg,  # a present, b absent
        -(math.log(1 - 0.8) + math.log(1 - 0.2)) / 2 - log_bg,  # nothing present: term 0
        -(log_gwrp_a + math.log((0.2 + 0.15 / 2 + 0.1 / 4 + 0.1 / 8) / 1.875)) / 2 - log_bg,
    ]
    loss = expansion_loss(probs, labels, d_fg=0.5, d_bg=1.0)
    assert loss.item() == pytest.approx(sum(expected) / 3)
    for i, value in enumerate(expected):
        single = expansion_loss(probs[i : i + 1], labels[i : i + 1], d_fg=0.5, d_bg=1.0)
        assert single.item() == pytest.approx(value)
    loss.backward()
    assert torch.isfinite(probs.grad).all()
    assert (probs.grad[0, 2] != 0).sum() == 1  # absent b: only its max pixel
    with pytest.raises(ValueError, match="labels must be"):
        expansion_loss(probs, labels[:, :2])
    with pytest.raises(ValueError, match="only 0/1"):
        expansion_loss(probs, labels * 2)


def test_constrain_loss_by_hand_with_and_without_clip():
    f = probs_2x2([0.3, 0.7, 0.5, 0.6], [0.7, 0.3, 0.5, 0.4]).requires_grad_()
    q = probs_2x2([0.9, 0.1, 0.5, 1.0], [0.1, 0.9, 0.5, 0.0]).requires_grad_()

    def kl(qs, fs, lo=0.0, hi=math.inf):
        return sum(
            qi * math.log(min(max(qi / fi, lo), hi)) for qi, fi in zip(qs, fs, strict=True) if qi
        )

    pixels = [  # (Q, f) per pixel
        ([0.9, 0.1], [0.3, 0.7]),
        ([0.1, 0.9], [0.7, 0.3]),
        ([0.5, 0.5], [0.5, 0.5]),
        ([1.0, 0.0], [0.6, 0.4]),
    ]
    plain = sum(kl(qs, fs) for qs, fs in pixels) / 4
    clipped = sum(kl(qs, fs, 0.5, 2.0) for qs, fs in pixels) / 4
    assert constrain_loss(f, q).item() == pytest.approx(plain)
    loss = constrain_loss(f, q, clip=(0.5, 2.0))
    assert loss.item() == pytest.approx(clipped) and clipped != pytest.approx(plain)
    loss.backward()
    assert q.grad is None  # the target is a constant (SEC's CRF layer has zero backward)
    # ratio 3 (clipped at 2) and 1/7 (clipped at 0.5): no gradient; Q = 0: none either.
    assert f.grad[0, 0, 0, 0] == 0 and f.grad[0, 1, 0, 0] == 0 and f.grad[0, 1, 1, 1] == 0
    # inside the clip range: d/df (-Q log f) / 4 pixels
    assert f.grad[0, 0, 1, 0].item() == pytest.approx(-0.5 / 0.5 / 4)
    f.grad = None
    constrain_loss(f, q).backward()
    assert f.grad[0, 0, 0, 0].item() == pytest.approx(-0.9 / 0.3 / 4)
    assert torch.isfinite(f.grad).all() and q.grad is None
    with pytest.raises(ValueError, match="clip"):
        constrain_loss(f, q, clip=(2.0, 0.5))
    with pytest.raises(ValueError, match="target shape"):
        constrain_loss(f, q[:, :1])


def test_constrain_loss_is_batch_mean_of_image_means():
    torch.manual_seed(0)
    f = torch.softmax(torch.randn(3, 4, 5, 6), 1)
    q = torch.softmax(torch.randn(3, 4, 5, 6), 1)
    per_image = [constrain_loss(f[i : i + 1], q[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(constrain_loss(f, q), torch.stack(per_image).mean())
    assert constrain_loss(q, q).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ CRF target
def halves_probs(n: int = 3, size: int = 20, p: float = 0.9) -> torch.Tensor:
    """(1, n, size, size): class 1 on the left half, class 2 on the right, with confidence p."""
    probs = torch.full((1, n, size, size), (1 - p) / (n - 1))
    probs[0, 1, :, : size // 2] = p
    probs[0, 2, :, size // 2 :] = p
    return probs


def test_crf_targets_is_a_floored_distribution_and_keeps_a_confident_argmax():
    size = 20
    images = np.full((1, 2 * size, 2 * size, 3), 100, np.uint8)
    probs = halves_probs(size=size).double()
    q = crf_targets(images, probs)
    assert q.shape == probs.shape and q.dtype == torch.float64 and not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(1, size, size, dtype=torch.float64))
    assert q.min() >= 1e-4 / (1 + 3e-4)  # clipped at 1e-4, then renormalised
    assert torch.equal(q.argmax(1), probs.argmax(1))
    # The pairwise terms act: a weakly wrong pixel inside the left half is absorbed.
    noisy = probs.clone()
    noisy[0, :, 5, 3] = torch.tensor([0.2, 0.35, 0.45])
    assert crf_targets(images, noisy).argmax(1)[0, 5, 3] == 1


def test_crf_targets_energy_is_logits_up_to_a_constant():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    logits = 3 * torch.randn(2, NUM_CLASSES, 6, 6)
    q = crf_targets(images, torch.softmax(logits, 1))
    for i in range(2):
        small = torch.from_numpy(images[i]).permute(2, 0, 1)[None].float()
        small = torch.nn.functional.interpolate(small, (6, 6), mode="bilinear", align_corners=True)
        small = small.round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
        by_logits = crf_from_unary(small, -logits[i].numpy(), SEC_TRAIN_CRF)
        by_logits = np.maximum(by_logits, 1e-4)
        by_logits /= by_logits.sum(0, keepdims=True)
        np.testing.assert_allclose(q[i].numpy(), by_logits, atol=1e-5)


def test_crf_targets_workers_match_inline_and_inputs_are_checked():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    torch.manual_seed(1)
    probs = floored_softmax(torch.randn(3, NUM_CLASSES, 4, 4))
    inline = crf_targets(images, probs)
    # fork: the test's parent holds no CUDA context, and spawn would re-import torch per worker.
    torch.testing.assert_close(crf_targets(images, probs, workers=2, start_method="fork"), inline)
    with pytest.raises(ValueError, match="images must be"):
        crf_targets(images[:2], probs)
    with pytest.raises(TypeError, match="uint8"):
        crf_targets(images.astype(np.float32), probs)
