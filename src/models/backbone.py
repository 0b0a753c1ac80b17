"""ResNet backbones split into IRNet's four stages, with configurable strides, dilations and BN mode.

One class serves every stage of the pipeline: the CAM classifier and the affinity net (IRNet strides
(2, 2, 2, 1), output stride 16) and DeepLab-v2 (strides (2, 2, 1, 1), dilations (1, 1, 2, 4), output
stride 8). ImageNet weights come from torchvision's weight enums; a tiny variant trains from scratch
on CPU for the synthetic experiments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

from src.utils.errors import UserError
from src.utils.untrusted import Source, read_torch, tensor_state_dict

log = logging.getLogger(__name__)

NORM_MODES = ("train", "fixed", "frozen")


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline machine, missing file)."""


class DtypePreservingFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d whose output keeps the input's dtype.

    The parent computes ``x * scale + bias`` with float32 ``scale``/``bias``, so under bf16/fp16
    autocast every frozen BN promotes its (half-precision) conv output back to float32 and the
    next conv casts it down again: more memory traffic and float32 activations saved for backward.
    Here scale and bias are still computed in float32 from the buffers, then cast once to the
    input's dtype. For float32 inputs the arithmetic is the parent's, op for op (identical
    results); buffers and state-dict keys are the parent's, so torchvision weights load as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class TinyResNet(ResNet):
    """A narrow ResNet (BasicBlock) with torchvision's module names, for CPU-sized experiments."""

    def __init__(
        self, widths: Sequence[int] = (32, 64, 128, 256), blocks: Sequence[int] = (1, 1, 1, 1)
    ):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], 1000)  # a complete torchvision ResNet; stages ignore it
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _build_resnet(arch: str) -> ResNet:
    if arch == "resnet_tiny":
        return TinyResNet()
    if not arch.startswith("resnet") and not arch.startswith("wide_resnet"):
        raise ValueError(
            f"backbone.arch={arch!r} is not a ResNet; use resnet_tiny/18/34/50/101/152"
        )
    return torchvision.models.get_model(arch, weights=None)


def _set_stride_and_dilation(layer: nn.Sequential, stride: int, dilation: int) -> None:
    """Rewrite a ResNet layer in place: stride of its first block, dilation of every 3x3 conv."""
    for i, block in enumerate(layer):
        convs3x3 = [block.conv2] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]
        for conv in convs3x3:
            conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
        if i == 0:
            # torchvision puts the stride on conv2 (Bottleneck) or conv1 (BasicBlock).
            strided = block.conv2 if isinstance(block, Bottleneck) else block.conv1
            strided.stride = (stride, stride)
            if block.downsample is not None:
                block.downsample[0].stride = (stride, stride)


def _pretrained_state_dict(arch: str, weights: str | None, weights_path: str | None) -> dict | None:
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"backbone.weights_path={path} does not exist. Point it at a torchvision ResNet "
                f"state dict (.pth), or set backbone.weights_path=null."
            )
        src = Source(
            path,
            "point backbone.weights_path at a torchvision ResNet state dict (.pth), or set "
            "backbone.weights_path=null",
            WeightsUnavailableError,
        )
        state = read_torch(src)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return tensor_state_dict(state, src)
    if not weights:
        return None
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"backbone.weights={weights!r} is not a torchvision weight of {arch}"
        ) from err
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    try:
        # torch.hub unpickles in full by default; the cached file is read like any other.
        state = enum.get_state_dict(progress=False, weights_only=True)
    except (URLError, OSError, RuntimeError) as err:
        raise WeightsUnavailableError(
            f"ImageNet weights {arch}.{weights} are not cached at {cache} and could not be "
            f"downloaded ({err}). On an offline machine, fetch {enum.url} elsewhere and copy it "
            f"to {cache} (or set TORCH_HOME), or pass backbone.weights_path=/path/to/file.pth; "
            f"backbone.weights=null trains from scratch."
        ) from err
    fix = f"delete {cache} and rerun to download it again"
    return tensor_state_dict(state, Source(cache, fix, WeightsUnavailableError))


class ResNetBackbone(nn.Module):
    """ResNet as four stages (stage1 = stem + layer1, stage2..4 = layer2..4).

    norm: "train" = ordinary BatchNorm; "fixed" = IRNet's FixedBatchNorm (running statistics always,
    affine parameters still trained); "frozen" = DeepLab's frozen BN (nothing in BN trains).
    frozen_stages: stages 1..k get no gradient (IRNet freezes conv1..layer2).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        weights: str | None = None,
        weights_path: str | None = None,
        strides: Sequence[int] = (2, 2, 2, 1),
        dilations: Sequence[int] = (1, 1, 1, 1),
        norm: str = "fixed",
        frozen_stages: int = 2,
    ):
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"backbone.norm={norm!r}; choose one of {NORM_MODES}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError(
                "backbone.strides and backbone.dilations need 4 entries (stem, layer2..4)"
            )
        net = _build_resnet(arch)
        state = _pretrained_state_dict(arch, weights, weights_path)
        if state is not None:
            missing, _ = net.load_state_dict(state, strict=False)
            if missing:
                raise WeightsUnavailableError(
                    f"pretrained weights for {arch} miss keys {missing[:5]}"
                )
            log.info("Loaded pretrained %s weights (%s)", arch, weights_path or weights)
        net.conv1.stride = (strides[0], strides[0])
        for layer, stride, dilation in zip(
            (net.layer2, net.layer3, net.layer4), strides[1:], dilations[1:], strict=True
        ):
            _set_stride_and_dilation(layer, stride, dilation)
        if norm == "frozen":
            _freeze_batchnorm(net)
        # stage1 = stem + layer1 (IRNet's naming); the stem alone feeds the affinity net's first edge.
        self.stage1 = nn.Sequential(
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1
        )
        self.stage2, self.stage3, self.stage4 = net.layer2, net.layer3, net.layer4
        self.stages = [self.stage1, self.stage2, self.stage3, self.stage4]
        self.out_channels = [_out_channels(s) for s in self.stages]
        self.stem_channels = net.conv1.out_channels
        self.output_stride = strides[0] * 2 * strides[1] * strides[2] * strides[3]
        self.norm, self.frozen_stages = norm, frozen_stages
        for stage in self.stages[:frozen_stages]:
            stage.requires_grad_(False)
        if norm == "fixed":
            # IRNet also keeps the stem BN's affine parameters fixed.
            net.conv1.requires_grad_(False)
            net.bn1.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        if self.norm != "train":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_stages(self, x: torch.Tensor, with_stem: bool = False) -> list[torch.Tensor]:
        """The four stage outputs; with_stem puts the stem's output (stride 4) in front."""
        feats = []
        for i, stage in enumerate(self.stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.frozen_stages):
                if i == 0 and with_stem:
                    x = stage[0](x)
                    feats.append(x)
                    x = stage[1](x)
                else:
                    x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


def _freeze_batchnorm(module: nn.Module) -> None:
    """Swap every BatchNorm2d for a (dtype-preserving) FrozenBatchNorm2d, keeping its statistics.

    ("fixed" mode needs no such swap: nn.BatchNorm2d in eval mode already returns the input's
    dtype under autocast.)
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = DtypePreservingFrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _out_channels(stage: nn.Module) -> int:
    block = [m for m in stage.modules() if isinstance(m, BasicBlock | Bottleneck)][-1]
    return (block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels
