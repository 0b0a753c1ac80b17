import copy
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from src.models.backbone import (
    DtypePreservingFrozenBatchNorm2d,
    ResNetBackbone,
    WeightsUnavailableError,
)


@pytest.mark.parametrize(
    ("kwargs", "stride"),
    [
        (dict(arch="resnet_tiny", norm="train", frozen_stages=0), 16),
        (dict(arch="resnet18"), 16),
        (dict(arch="resnet50", strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4), norm="frozen"), 8),
    ],
)
def test_output_stride_and_channels(kwargs, stride):
    net = ResNetBackbone(**kwargs)
    feats = net.forward_stages(torch.randn(1, 3, 64, 64))
    assert net.output_stride == stride
    assert feats[-1].shape[-1] == 64 // stride
    assert [f.shape[1] for f in feats] == net.out_channels


def test_irnet_freezing_keeps_early_stages_and_bn_statistics_fixed():
    net = ResNetBackbone(arch="resnet18", norm="fixed", frozen_stages=2)
    assert not any(p.requires_grad for p in net.stage1.parameters())
    assert not any(p.requires_grad for p in net.stage2.parameters())
    assert all(p.requires_grad for p in net.stage4.parameters())
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = bns[-1].running_mean.clone()
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(before, bns[-1].running_mean)
    assert net.stage1[0][0].weight.grad is None


def test_frozen_norm_has_no_trainable_bn():
    net = ResNetBackbone(arch="resnet18", norm="frozen", frozen_stages=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())  # convs train, BN holds buffers only


def test_weights_path_loads_a_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    net = ResNetBackbone(arch="resnet18", weights_path=str(path), frozen_stages=0)
    assert torch.equal(net.stage1[0][0].weight, reference.conv1.weight)
    assert torch.equal(net.stage4[0].conv1.weight, reference.layer4[0].conv1.weight)


def test_missing_weights_path_names_the_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="nope.pth does not exist"):
        ResNetBackbone(arch="resnet18", weights_path=str(tmp_path / "nope.pth"))


def test_offline_machine_gets_instructions(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        WeightsUnavailableError, match=r"(?s)not cached at .*resnet50-.*weights_path"
    ):
        ResNetBackbone(arch="resnet50", weights="IMAGENET1K_V1")


def test_unknown_weight_name():
    with pytest.raises(ValueError, match="not a torchvision weight"):
        ResNetBackbone(arch="resnet18", weights="IMAGENET_TYPO")


def test_stem_output_for_side_branches():
    net = ResNetBackbone(arch="resnet_tiny", norm="train", frozen_stages=0)
    feats = net.forward_stages(torch.randn(1, 3, 64, 64), with_stem=True)
    assert len(feats) == 5 and feats[0].shape[1] == net.stem_channels and feats[0].shape[-1] == 16


def _randomize_bn(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            n = m.weight.numel()
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def _swap_in_torchvision_frozen_bn(module: nn.Module) -> None:
    """The reference: torchvision's own FrozenBatchNorm2d (fp32 scale/bias) with the same buffers."""
    for name, child in module.named_children():
        if isinstance(child, DtypePreservingFrozenBatchNorm2d):
            ref = FrozenBatchNorm2d(child.weight.numel(), eps=child.eps)
            ref.load_state_dict(child.state_dict())
            setattr(module, name, ref)
        else:
            _swap_in_torchvision_frozen_bn(child)


def test_frozen_bn_keeps_float32_results_and_state_dict_keys():
    torch.manual_seed(0)
    net = ResNetBackbone(arch="resnet18", norm="frozen", frozen_stages=0).eval()
    _randomize_bn(net)
    ref = copy.deepcopy(net)
    _swap_in_torchvision_frozen_bn(ref)
    assert not any(type(m) is DtypePreservingFrozenBatchNorm2d for m in ref.modules())
    assert list(net.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(net.forward_stages(x), ref.forward_stages(x), strict=True):
            assert got.dtype == torch.float32
            assert torch.equal(got, want)


@pytest.mark.parametrize("norm", ["frozen", "fixed"])
def test_backbone_stays_bf16_under_autocast(norm):
    torch.manual_seed(0)
    net = ResNetBackbone(arch="resnet18", norm=norm, frozen_stages=0).eval()
    _randomize_bn(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp32 = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = net.forward_stages(x, with_stem=True)
            bn_out = net.stage1[0][1](feats[0].new_ones(1, net.stem_channels, 2, 2))
    assert bn_out.dtype == torch.bfloat16
    assert all(f.dtype == torch.bfloat16 for f in feats)
    cos = F.cosine_similarity(feats[-1].float().flatten(), fp32.flatten(), dim=0)
    assert cos > 0.99
    if norm == "frozen":  # torchvision's FrozenBatchNorm2d would have promoted to float32
        ref = copy.deepcopy(net)
        _swap_in_torchvision_frozen_bn(ref)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert ref(x).dtype == torch.float32
