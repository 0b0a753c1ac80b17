from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.models.backbone import ResNetBackbone
from src.models.deeplab import (
    ASPP,
    DeepLabV2,
    SegmenterModule,
    balanced_class_weights,
    msc_logits,
    msc_loss,
)

NUM_CLASSES = 3


def tiny_deeplab(**kwargs) -> DeepLabV2:
    torch.manual_seed(0)
    backbone = ResNetBackbone(
        arch="resnet_tiny",
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        norm="train",
        frozen_stages=0,
        **kwargs,
    )
    return DeepLabV2(backbone, NUM_CLASSES)


def with_fake_trainer(module: SegmenterModule, steps: int = 100) -> SegmenterModule:
    module._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    return module


def test_output_stride_8():
    net = tiny_deeplab().eval()
    assert net.output_stride == 8
    assert net(torch.randn(2, 3, 65, 65)).shape == (2, NUM_CLASSES, 9, 9)


def test_aspp_is_sum_of_branches_and_initialised():
    aspp = ASPP(16, NUM_CLASSES)
    x = torch.randn(1, 16, 12, 12)
    assert [b.dilation[0] for b in aspp.branches] == [6, 12, 18, 24]
    assert [b.padding[0] for b in aspp.branches] == [6, 12, 18, 24]
    expected = sum(b(x) for b in aspp.branches)
    torch.testing.assert_close(aspp(x), expected)
    assert aspp(x).shape == (1, NUM_CLASSES, 12, 12)
    assert all((b.bias == 0).all() for b in aspp.branches)
    w = torch.cat([b.weight.flatten() for b in aspp.branches])
    assert abs(w.std().item() - 0.01) < 0.002


def test_msc_training_and_eval_outputs():
    net = tiny_deeplab().eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        outs = msc_logits(net, x, (1.0, 0.75, 0.5), training=True)
        assert len(outs) == 4
        size = outs[0].shape[-2:]
        ups = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[:3]]
        torch.testing.assert_close(outs[3], torch.stack(ups).amax(0))
        assert outs[1].shape[-1] < size[-1] and outs[2].shape[-1] < outs[1].shape[-1]
        fused = msc_logits(net, x, (1.0, 0.75, 0.5), training=False)
        assert torch.is_tensor(fused)
        torch.testing.assert_close(fused, outs[3])


def test_msc_loss_is_sum_of_per_output_ce():
    torch.manual_seed(0)
    target = torch.randint(0, NUM_CLASSES, (2, 65, 65))
    target[:, :5] = 255
    logits = [torch.randn(2, NUM_CLASSES, s, s) for s in (9, 7, 5, 9)]
    manual = 0.0
    for lg in logits:
        s = lg.shape[-1]
        t = F.interpolate(target[:, None].float(), size=(s, s), mode="nearest")[:, 0].long()
        manual += F.cross_entropy(lg, t, ignore_index=255)
    torch.testing.assert_close(msc_loss(logits, target), manual)
    # same-size logit: plain CE
    full = torch.randn(2, NUM_CLASSES, 65, 65)
    torch.testing.assert_close(
        msc_loss([full], target), F.cross_entropy(full, target, ignore_index=255)
    )


def test_optimizer_groups_lr_mults_and_bias_wd():
    module = with_fake_trainer(SegmenterModule(tiny_deeplab(), NUM_CLASSES))
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    groups = opt.param_groups
    assert len(groups) == 3
    assert [g["lr"] for g in groups] == [2.5e-4, 2.5e-3, 5e-3]
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4, 0.0]
    assert all(g["momentum"] == 0.9 for g in groups)
    assert all(p.dim() == 1 for p in groups[2]["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in module.net.parameters() if p.requires_grad])


def test_frozen_norm_has_no_bn_params_in_optimizer():
    backbone = ResNetBackbone(
        arch="resnet18",
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        norm="frozen",
        frozen_stages=0,
    )
    module = with_fake_trainer(SegmenterModule(DeepLabV2(backbone, NUM_CLASSES), NUM_CLASSES))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.net.modules())
    opt_params = {
        id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    conv_params = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Conv2d)}
    backbone_params = {id(p) for p in backbone.parameters()}
    assert backbone_params & opt_params == conv_params
    assert all(p.dim() == 4 for g in module.param_groups()[:1] for p in g["params"])


def test_sgd_steps_reduce_loss():
    module = with_fake_trainer(SegmenterModule(tiny_deeplab(), NUM_CLASSES))
    module.log = lambda *a, **k: None
    module.train()
    torch.manual_seed(1)
    image = torch.randn(2, 3, 65, 65)
    mask = (image[:, 0] > 0).long() + (image[:, 1] > 1).long()
    batch = {"image": image, "mask": mask}
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_validation_metric_and_predict_masks():
    module = SegmenterModule(tiny_deeplab(), NUM_CLASSES).eval()
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value)
    image = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        module.validation_step({"image": image, "mask": torch.randint(0, 3, (2, 65, 65))}, 0)
    module.on_validation_epoch_end()
    assert 0.0 <= float(logged["val/mIoU"]) <= 1.0
    batch = {"image": image, "id": ["a", "b"], "size": [(65, 65), (60, 50)]}
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert [it["id"] for it in items] == ["a", "b"]
    assert items[0]["mask"].shape == (65, 65) and items[1]["mask"].shape == (60, 50)
    assert all(it["mask"].dtype == np.uint8 for it in items)
    assert all(it["mask"].max() < NUM_CLASSES for it in items)


def test_predict_logits_cover_each_image_at_stride_8():
    module = SegmenterModule(tiny_deeplab(), NUM_CLASSES).eval()
    module.predict_logits = True
    batch = {"image": torch.randn(2, 3, 64, 64), "id": ["a", "b"], "size": [(64, 64), (40, 57)]}
    with torch.no_grad():
        a, b = module.predict_step(batch, 0)
    assert a["logits"].shape == (NUM_CLASSES, 8, 8) and b["logits"].shape == (NUM_CLASSES, 5, 8)
    # The mask is the argmax of the same logits, upsampled.
    up = F.interpolate(torch.from_numpy(a["logits"])[None], size=(64, 64), mode="bilinear")
    assert (up[0].argmax(0).numpy() == a["mask"]).mean() > 0.99


def test_poly_lr_is_held_between_updates():
    from src.models.optim import poly_lambda

    factor = poly_lambda(100, 0.9, every=10)
    assert factor(0) == factor(9) == 1.0
    assert factor(10) == factor(19) == pytest.approx(0.9**0.9)
    assert poly_lambda(100, 0.9)(5) == pytest.approx(0.95**0.9)


def test_segmenter_checkpoint_round_trip_and_bad_files(tmp_path):
    from src.models.deeplab import CheckpointError, load_segmenter, save_segmenter

    net = tiny_deeplab().eval()
    spec = {
        "backbone": {
            "_target_": "src.models.backbone.ResNetBackbone",
            "arch": "resnet_tiny",
            "strides": [2, 2, 1, 1],
            "dilations": [1, 1, 2, 4],
            "norm": "train",
            "frozen_stages": 0,
        },
        "num_classes": NUM_CLASSES,
        "class_names": ["bg", "a", "b"][:NUM_CLASSES],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "scales": [1.0],
        "rates": [6, 12, 18, 24],
    }
    save_segmenter(tmp_path / "s.pt", net, spec)
    loaded, got = load_segmenter(tmp_path / "s.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert got["num_classes"] == NUM_CLASSES
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a segmenter checkpoint"):
        load_segmenter(tmp_path / "other.pt")


def test_balanced_class_weights():
    counts = [900, 100, 0, 25]
    w = balanced_class_weights(counts)
    freq = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    present = freq > 0
    # w ∝ 1/sqrt(f) on the classes present, the average pixel keeps weight 1, absent ones get 1.
    ratio = w[present].double() * freq[present].sqrt()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)
    assert float((freq * w.double()).sum()) == pytest.approx(1.0)
    assert w[2] == 1.0 and w[3] > w[1] > w[0]
    assert torch.equal(balanced_class_weights(counts, "none"), torch.ones(4))
    with pytest.raises(ValueError, match="segmenter.class_balance"):
        balanced_class_weights(counts, "median")


def test_msc_loss_class_weight_matches_weighted_ce():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    weight = torch.tensor([0.5, 2.0, 3.0])
    expected = F.cross_entropy(logits[0], target, weight=weight, ignore_index=255)
    small = F.interpolate(target[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    expected = expected + F.cross_entropy(logits[1], small, weight=weight, ignore_index=255)
    assert torch.allclose(msc_loss(logits, target, class_weight=weight), expected)
    # The module keeps the weights as a buffer (it moves with .to() and resumes from a .ckpt).
    module = SegmenterModule(tiny_deeplab(), 3, class_weight=weight)
    assert torch.equal(module.class_weight, weight) and "class_weight" in module.state_dict()
