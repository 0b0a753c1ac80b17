"""Shared pieces of the seed-driven baselines SEC (Kolesnikov & Lampert 2016) and DSRG (Huang et
al. 2018): DeepLab VGG-16 nets, SEC's floored softmax, the seeding / expansion (GWRP) /
constrain-to-boundary losses, and the training-time CRF target.

Everything works at the backbone's output stride (41x41 for a 321x321 input). Probabilities
passed to the losses are expected to be :func:`floored_softmax` outputs (strictly positive), as
in SEC; the losses never produce NaN for entries they ignore, but a zero probability on a cue,
present class or CRF-target entry is a genuine infinite loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from src.models.backbone import WeightsUnavailableError, _pretrained_state_dict
from src.postprocess.crf import SEC_TRAIN_CRF, CRFParams, crf_from_unary, run_parallel
from src.utils.untrusted import Source, read_torch, tensor_state_dict

log = logging.getLogger(__name__)

# Indices in torchvision's vgg16().features, kept so that its state-dict keys load unchanged.
_POOLS_STRIDE2 = (4, 9, 16)  # pool1..3
_POOL4, _POOL5 = 23, 30
_CONV5 = (24, 26, 28)
HEADS = ("largefov", "aspp")


# ------------------------------------------------------------------------------ backbone
def _vgg_state_dict(weights: str | None, weights_path: str | None) -> dict | None:
    """A torchvision vgg16 state dict, or None. Torchvision enums go through backbone.py's
    loader (same cache, offline and error conventions); a local file is read with the same
    untrusted-file helpers, with a VGG-specific fix in the messages."""
    if not weights_path:
        return _pretrained_state_dict("vgg16", weights, None)
    path = Path(weights_path).expanduser()
    fix = (
        "point backbone.weights_path at a torchvision vgg16 state dict (.pth, 'features.*' "
        "keys), or set backbone.weights_path=null"
    )
    if not path.is_file():
        raise WeightsUnavailableError(f"backbone.weights_path={path} does not exist. Fix: {fix}")
    src = Source(path, fix, WeightsUnavailableError)
    state = read_torch(src)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return tensor_state_dict(state, src)


# DeepLab-LargeFOV's vgg16_20M (SEC's and DSRG's initial model) turned VGG-16's fc6/fc7 into
# convolutions by decimation: fc6 (4096 x 512 x 7 x 7) keeps every 4th filter and every 3rd
# spatial tap (-> 1024 x 512 x 3 x 3, a dilated 3 x 3), fc7 every 4th output and input
# (-> 1024 x 1024 x 1 x 1), biases every 4th.
FC67_KEYS = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
FC67_HIDDEN = 1024


def decimated_fc67(state: dict) -> dict[str, torch.Tensor] | None:
    """DeepLab-LargeFOV's fc6/fc7 from a torchvision vgg16 state dict: {"fc6.weight": (1024, 512,
    3, 3), "fc6.bias": (1024,), "fc7.weight": (1024, 1024, 1, 1), "fc7.bias": (1024,)}.

    None when the state holds none of torchvision's fc6/fc7 entries (a features-only file) or
    non-finite ones (torchvision's IMAGENET1K_FEATURES leaves its classifier without values).
    Some of the four entries without the others, or other shapes, are an error.
    """
    present = [k for k in FC67_KEYS if k in state]
    if not present:
        return None
    if len(present) < len(FC67_KEYS):
        missing = [k for k in FC67_KEYS if k not in state]
        raise WeightsUnavailableError(
            f"vgg16 weights hold {present} but miss {missing}: fc6/fc7 need all four "
            "(a torchvision vgg16 state dict, or one without any 'classifier.*' entry)"
        )
    w6, b6, w7, b7 = (state[k] for k in FC67_KEYS)
    shapes = [tuple(t.shape) for t in (w6, b6, w7, b7)]
    if shapes != [(4096, 512 * 7 * 7), (4096,), (4096, 4096), (4096,)]:
        raise WeightsUnavailableError(
            f"vgg16 classifier.0/3 shapes {shapes} are not torchvision VGG-16's "
            "[(4096, 25088), (4096,), (4096, 4096), (4096,)]"
        )
    fc67 = {
        "fc6.weight": w6.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3].clone(),
        "fc6.bias": b6[::4].clone(),
        "fc7.weight": w7[::4, ::4].reshape(FC67_HIDDEN, FC67_HIDDEN, 1, 1).clone(),
        "fc7.bias": b7[::4].clone(),
    }
    if not all(torch.isfinite(t).all() for t in fc67.values()):
        log.warning("vgg16 weights: the classifier is not finite: fc6/fc7 start fresh")
        return None
    return fc67


def _largefov_features(features: nn.Sequential) -> nn.Sequential:
    """Turn torchvision's vgg16 features into DeepLab-LargeFOV's (SEC's) conv1..pool5a, in place.

    pool1..3 become 3x3 stride 2 padding 1 (DeepLab's Caffe pools; torchvision's are 2x2). Floor
    mode gives ceil(H/8) at the output, like ResNetBackbone and cam.strided_size, and 41 for 321
    exactly as Caffe's ceil mode (the two differ only for even sizes). pool4/pool5 keep the
    resolution (3x3 stride 1), conv5 is dilated x2, and SEC's pool5a (3x3 average, stride 1)
    is appended. Module indices stay torchvision's, so its 'features.N' keys still match.
    """
    for i in _POOLS_STRIDE2:
        features[i] = nn.MaxPool2d(3, stride=2, padding=1)
    features[_POOL4] = nn.MaxPool2d(3, stride=1, padding=1)
    for i in _CONV5:
        conv = features[i]
        conv.dilation, conv.padding = (2, 2), (2, 2)
    features[_POOL5] = nn.MaxPool2d(3, stride=1, padding=1)
    features.append(nn.AvgPool2d(3, stride=1, padding=1))
    return features


class VGG16Backbone(nn.Module):
    """VGG-16 conv1_1..pool5a as in DeepLab-LargeFOV / SEC: output stride 8, 512 channels.

    Exposes ``output_stride`` and ``out_channels`` (a list, last entry = what forward returns)
    like ResNetBackbone, so heads and training code treat both alike. All layers train (SEC
    and DSRG fine-tune conv1..conv5 at the base learning rate); there is no BatchNorm.
    ``weights``: a torchvision ``VGG16_Weights`` name. IMAGENET1K_V1 expects torchvision's
    ImageNet mean/std; IMAGENET1K_FEATURES holds the original Caffe VGG-16 convolutions (what
    DeepLab's vgg16_20M starts from) and expects 0..255 inputs minus the channel means.
    ``weights_path`` (takes precedence): a local torchvision-layout vgg16 state dict.
    The 'features.*' entries load here; torchvision's fc6/fc7 ('classifier.0/3.*'), when present,
    are decimated as DeepLab-LargeFOV's vgg16_20M (:func:`decimated_fc67`) and kept in
    ``imagenet_fc67`` (not a parameter) for :func:`seeded_net` to start the head's fc6/fc7 from;
    None with random init or without them.
    """

    output_stride = 8

    def __init__(self, weights: str | None = None, weights_path: str | None = None):
        super().__init__()
        # Only the conv part: torchvision.models.vgg16() would also build (and initialise) the
        # 120M-parameter classifier that is thrown away.
        features = make_layers(cfgs["D"])
        for m in features.modules():
            if isinstance(m, nn.Conv2d):  # torchvision VGG's own initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        state = _vgg_state_dict(weights, weights_path)
        self.imagenet_fc67 = None if state is None else decimated_fc67(state)
        if state is not None and self.imagenet_fc67 is None:
            log.warning("vgg16 weights without fc6/fc7 ('classifier.0/3'): the head starts fresh")
        if state is not None:
            prefix = "features."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            missing, _ = features.load_state_dict(own, strict=False)
            if missing:
                raise WeightsUnavailableError(
                    f"pretrained weights for vgg16 miss keys {[prefix + k for k in missing[:5]]} "
                    f"(expected a torchvision vgg16 state dict with 'features.N.weight/bias')"
                )
            log.info("Loaded pretrained vgg16 weights (%s)", weights_path or weights)
        self.features = _largefov_features(features)
        self.out_channels = [512]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ------------------------------------------------------------------------------ heads
def _fc67(in_channels: int, hidden: int, dilation: int, dropout: float) -> list[nn.Module]:
    """fc6 (3x3, dilated) -> ReLU -> dropout -> fc7 (1x1) -> ReLU -> dropout.

    Element-wise nn.Dropout, not Dropout2d: Caffe's Dropout layer (SEC, DSRG) drops single
    activations of the 4-D blob, whereas Dropout2d would drop whole channels, a far stronger
    regulariser on 1024 channels. fc6/fc7 start fresh here (Kaiming, zero bias); on an ImageNet
    VGG16Backbone :func:`seeded_net` then loads the decimated ImageNet fc6/fc7 into them, as SEC
    and DSRG start from DeepLab's vgg16_20M (:func:`decimated_fc67`).
    """
    fc6 = nn.Conv2d(in_channels, hidden, 3, padding=dilation, dilation=dilation)
    fc7 = nn.Conv2d(hidden, hidden, 1)
    layers: list[nn.Module] = []
    for conv in (fc6, fc7):
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


def _fc8(hidden: int, num_classes: int) -> nn.Conv2d:
    """The classifier, initialised N(0, 0.01) with zero bias as in SEC/DSRG."""
    fc8 = nn.Conv2d(hidden, num_classes, 1)
    nn.init.normal_(fc8.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc8.bias)
    return fc8


def _check_head_args(in_channels: int, num_classes: int, hidden: int, dropout: float) -> None:
    sizes = {"in_channels": in_channels, "num_classes": num_classes, "hidden": hidden}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class LargeFOVHead(nn.Sequential):
    """DeepLab-LargeFOV (SEC): fc6 3x3 dilation 12 -> fc7 1x1 -> fc8 1x1, dropout after fc6/fc7."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 1024,
        dilation: int = 12,
        dropout: float = 0.5,
    ):
        _check_head_args(in_channels, num_classes, hidden, dropout)
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        super().__init__(*_fc67(in_channels, hidden, dilation, dropout), _fc8(hidden, num_classes))

    @property
    def fc8(self) -> nn.Conv2d:
        return self[-1]

    def fc8_layers(self) -> list[nn.Conv2d]:
        return [self.fc8]

    def fc67_layers(self) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
        fc6, fc7 = (m for m in self if isinstance(m, nn.Conv2d) and m is not self.fc8)
        return [(fc6, fc7)]


class ASPPVGGHead(nn.Module):
    """DeepLab-ASPP for VGG (DSRG): one fc6 (3x3, dilation = rate) -> fc7 -> fc8 branch per rate,
    dropout after fc6/fc7, branch logits summed."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        hidden: int = 1024,
        dropout: float = 0.5,
    ):
        super().__init__()
        _check_head_args(in_channels, num_classes, hidden, dropout)
        self.rates = tuple(int(r) for r in rates)
        if not self.rates or min(self.rates) < 1:
            raise ValueError(f"rates must be a non-empty list of dilations >= 1, got {rates}")
        self.branches = nn.ModuleList(
            nn.Sequential(*_fc67(in_channels, hidden, r, dropout), _fc8(hidden, num_classes))
            for r in self.rates
        )

    def fc8_layers(self) -> list[nn.Conv2d]:
        return [branch[-1] for branch in self.branches]

    def fc67_layers(self) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
        return [(branch[0], branch[3]) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class SeededNet(nn.Module):
    """Backbone -> head; forward gives logits (B, C, h, w) at the backbone's output stride."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything the head holds (fc6..fc8)."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def fc8_parameters(self) -> list[nn.Parameter]:
        """The classifier(s) fc8, always freshly initialised (SEC/DSRG: lr x10, biases x20)."""
        return [p for m in self.head.fc8_layers() for p in m.parameters() if p.requires_grad]

    def fc67_parameters(self) -> list[nn.Parameter]:
        """fc6/fc7 of every branch (ImageNet-initialised on an ImageNet VGG: SEC/DSRG's lr x1)."""
        fc8 = {id(p) for p in self.fc8_parameters()}
        return [p for p in self.head_parameters() if id(p) not in fc8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def seeded_net(
    backbone: nn.Module, num_classes: int, head: str = "largefov", **head_kwargs
) -> SeededNet:
    """SEC's net (head="largefov") or DSRG's (head="aspp") on any backbone exposing
    ``out_channels`` (its last entry feeds the head), e.g. VGG16Backbone or ResNetBackbone.

    A backbone with ``imagenet_fc67`` (VGG16Backbone loaded from torchvision vgg16 weights)
    starts fc6/fc7 from them, every ASPP branch from the same ones (SEC ``train.prototxt`` and
    DSRG ``train-s.prototxt`` name fc6/fc7 with no filler: they come from vgg16_20M); a
    random-init backbone leaves them fresh (Kaiming).
    """
    in_channels = backbone.out_channels[-1]
    if head == "largefov":
        module = LargeFOVHead(in_channels, num_classes, **head_kwargs)
    elif head == "aspp":
        module = ASPPVGGHead(in_channels, num_classes, **head_kwargs)
    else:
        raise ValueError(f"head={head!r}; choose one of {HEADS}")
    fc67 = getattr(backbone, "imagenet_fc67", None)
    if fc67 is not None:
        _load_fc67(module, fc67)
    return SeededNet(backbone, module)


def _load_fc67(head: LargeFOVHead | ASPPVGGHead, fc67: dict[str, torch.Tensor]) -> None:
    for fc6, fc7 in head.fc67_layers():
        want = tuple(fc67["fc6.weight"].shape[:2])
        if (fc6.out_channels, fc6.in_channels) != want:
            raise ValueError(
                f"fc6 is {fc6.in_channels} -> {fc6.out_channels} channels but the ImageNet "
                f"fc6/fc7 (DeepLab's decimation) are {want[1]} -> {want[0]}: set seeded.net."
                f"hidden={FC67_HIDDEN}, or pretrained=false for a fresh (random) head"
            )
        with torch.no_grad():
            for conv, name in ((fc6, "fc6"), (fc7, "fc7")):
                conv.weight.copy_(fc67[f"{name}.weight"])
                conv.bias.copy_(fc67[f"{name}.bias"])
    log.info("fc6/fc7 start from the decimated ImageNet VGG-16 fc6/fc7 (DeepLab-LargeFOV)")


# ------------------------------------------------------------------------------ losses
def _check_probs(probs: torch.Tensor, name: str = "probs") -> None:
    if not torch.is_tensor(probs) or probs.ndim != 4:
        shape = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
        raise ValueError(f"{name} must be a (B, C, h, w) tensor, got {shape}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {probs.dtype}")


def _safe_log(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log(x) where ``keep``, 0 elsewhere, with zero (not NaN) gradient at the dropped entries:
    the log sees 1 there, so a zero probability outside ``keep`` cannot produce 0 * inf."""
    return torch.where(keep, x, torch.ones_like(x)).log()


def floored_softmax(logits: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """SEC's softmax over classes (dim 1) plus ``floor``, renormalised: every probability is at
    least floor / (1 + C * floor), so the log-losses stay finite."""
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    if not torch.is_tensor(logits) or logits.ndim < 2:
        raise ValueError("logits must be a tensor with classes in dim 1, e.g. (B, C, h, w)")
    probs = torch.softmax(logits, dim=1) + floor
    return probs / probs.sum(dim=1, keepdim=True)


def seeding_loss(probs: torch.Tensor, cues: torch.Tensor) -> torch.Tensor:
    """SEC's seeding loss: per image −Σ log f_{u,c} over its cue entries (u, c) / their number,
    averaged over the batch.

    ``cues``: bool (B, C, h, w); a pixel may carry several classes. An image without any cue
    still counts in the batch mean but contributes 0 (the official layer would divide by zero).
    DSRG's balanced variant is this loss on the background channel plus this loss on the
    foreground channels.
    """
    _check_probs(probs)
    if not torch.is_tensor(cues) or cues.shape != probs.shape:
        shape = tuple(cues.shape) if torch.is_tensor(cues) else type(cues).__name__
        raise ValueError(f"cues must have the shape of probs {tuple(probs.shape)}, got {shape}")
    if cues.dtype != torch.bool:
        raise TypeError(f"cues must be a bool tensor, got {cues.dtype} (use cues > 0.5)")
    total = _safe_log(probs, cues).sum(dim=(1, 2, 3))
    count = cues.sum(dim=(1, 2, 3)).clamp_min(1)
    return -(total / count).mean()


def gwrp(probs: torch.Tensor, decay: float) -> torch.Tensor:
    """Global weighted rank pooling (B, C, h, w) -> (B, C): each class's h*w scores sorted in
    descending order, weighted by decay**rank (rank 0 = highest) and normalised by the weights'
    sum. decay 1 is global average pooling; decay -> 0 approaches global max pooling."""
    _check_probs(probs)
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    scores = probs.flatten(2).sort(dim=-1, descending=True).values
    # float64 weights: decay**rank over 1,681 ranks, then normalised, without float32 drift.
    weights = decay ** torch.arange(scores.shape[-1], dtype=torch.float64, device=probs.device)
    weights = (weights / weights.sum()).to(probs.dtype)
    return (scores * weights).sum(dim=-1)


def _check_labels(labels: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Image labels (B, C) as bool; any dtype holding only 0/1."""
    if not torch.is_tensor(labels) or labels.shape != probs.shape[:2]:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be (B, C) = {tuple(probs.shape[:2])}, got {shape}")
    if labels.dtype != torch.bool:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels must hold only 0/1 (or be a bool tensor)")
        labels = labels != 0
    return labels


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over ``mask`` (rows without any entry give 0)."""
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def expansion_loss(
    probs: torch.Tensor, labels: torch.Tensor, d_fg: float = 0.996, d_bg: float = 0.999
) -> torch.Tensor:
    """SEC's expand loss with GWRP. Per image: −mean over present foreground classes of
    log GWRP_c(d_fg) − mean over absent foreground classes of log(1 − max_u f_{u,c})
    − log GWRP_bg(d_bg); batch mean.

    ``labels``: (B, C) image labels, column 0 = background, which is always treated as present
    whatever column 0 says. A term without classes (no foreground present, or all present) is 0.
    """
    _check_probs(probs)
    labels = _check_labels(labels, probs)
    present = labels[:, 1:]
    fg = probs[:, 1:]
    log_fg = _safe_log(gwrp(fg, d_fg), present)
    log_absent = _safe_log(1 - fg.amax(dim=(2, 3)), ~present)
    log_bg = gwrp(probs[:, :1], d_bg)[:, 0].log()
    per_image = -_masked_mean(log_fg, present) - _masked_mean(log_absent, ~present) - log_bg
    return per_image.mean()


def constrain_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Constrain-to-boundary loss: per image, mean over pixels of Σ_c Q log(Q / f); batch mean.

    Q = ``target.detach()`` (SEC's CRF layer has zero backward, so the gradient reaches
    ``probs`` only). ``clip=(lo, hi)`` clips the ratio Q / f first, as DSRG does with
    (0.05, 20); clipped entries then pass no gradient. Entries with Q = 0 contribute 0.
    """
    _check_probs(probs)
    _check_probs(target, "target")
    if target.shape != probs.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match probs {tuple(probs.shape)}"
        )
    if clip is not None and not (len(clip) == 2 and 0 < clip[0] < clip[1]):
        raise ValueError(f"clip must be (lo, hi) with 0 < lo < hi, got {clip}")
    q = target.detach()
    keep = q > 0
    ratio = q / torch.where(keep, probs, torch.ones_like(probs))
    if clip is not None:
        ratio = ratio.clamp(*clip)
    return (q * _safe_log(ratio, keep)).sum(dim=1).mean()


# ------------------------------------------------------------------------------ CRF target
def _crf_one(item: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    """run_parallel work item (module level, so it pickles): one image's mean-field Q."""
    return crf_from_unary(*item)


def _downsize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> uint8 (B, h, w, 3), bilinear with corner-aligned sampling and
    rounding, like SEC's scipy ``zoom(order=1)`` followed by ``np.round``."""
    if images.shape[1:3] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def crf_targets(
    images: np.ndarray,
    probs: torch.Tensor,
    params: CRFParams = SEC_TRAIN_CRF,
    workers: int = 0,
    min_prob: float = 1e-4,
    start_method: str = "spawn",
) -> torch.Tensor:
    """SEC's training-time CRF target Q (B, C, h, w) for :func:`constrain_loss`, without grad.

    ``images``: uint8 RGB (B, H, W, 3), the network input before normalisation, downsized
    bilinearly to the probs grid (h, w). The unary energy is −log(probs): SEC feeds −logit,
    which differs from −log softmax(logit) only by the per-pixel log-sum-exp, a constant over
    classes that mean-field inference ignores (with floored probs the energy is moreover capped
    near −log floor). Default params: SEC's CRF at scale_factor 12 (:data:`SEC_TRAIN_CRF`).
    Q is clipped at ``min_prob`` and renormalised, then returned on probs' device and dtype.
    ``workers > 1`` spreads images over a fresh process pool per call (:func:`run_parallel`,
    ``start_method`` passed on). On the 41x41 grid one image takes milliseconds while a spawned
    worker re-imports torch, so inline (0 or 1) is usually fastest at training time; "fork"
    starts workers cheaply (safe here: workers run numpy/pydensecrf only, never CUDA).
    """
    _check_probs(probs)
    images = np.asarray(images)
    b, _, h, w = probs.shape
    if images.ndim != 4 or images.shape[0] != b or images.shape[3] != 3:
        raise ValueError(f"images must be (B={b}, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB (before normalisation), got {images.dtype}")
    if not 0 < min_prob < 1:
        raise ValueError(f"min_prob must be in (0, 1), got {min_prob}")
    small = _downsize_images(np.ascontiguousarray(images), (h, w))
    energy = -probs.detach().float().clamp_min(1e-12).log().cpu().numpy()
    items = [(small[i], energy[i], params) for i in range(b)]
    q = np.stack(run_parallel(_crf_one, items, workers, start_method=start_method)) if b else energy
    q = np.maximum(q, min_prob)
    q /= q.sum(axis=1, keepdims=True)
    return torch.from_numpy(q).to(device=probs.device, dtype=probs.dtype)
