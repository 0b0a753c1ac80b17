import pytest
import torch

from src.models.backbone import ResNetBackbone
from src.models.cam import CAMClassifier, CAMNet, keep_and_normalise, multiscale_cams


def tiny_net(extra_channels=0, num_classes=4):
    backbone = ResNetBackbone(arch="resnet_tiny", norm="train", frozen_stages=0)
    return CAMNet(backbone, num_classes=num_classes, extra_channels=extra_channels)


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


def test_extra_map_is_concatenated_and_required():
    net = tiny_net(extra_channels=1).eval()
    x, m = torch.randn(1, 3, 64, 64), torch.rand(1, 1, 32, 32)
    assert net.classifier.in_channels == net.backbone.out_channels[-1] + 1
    assert not torch.allclose(net(x, m), net(x, torch.zeros_like(m)))
    with pytest.raises(ValueError, match="extra map"):
        net(x)


def test_multiscale_cams_flip_equivariance():
    net = tiny_net().eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        strided, high = multiscale_cams(net, x, scales=(1.0, 0.5), flip=True)
        strided_f, high_f = multiscale_cams(net, x.flip(-1), scales=(1.0, 0.5), flip=True)
    assert strided.shape == (1, 4, 16, 12) and high.shape == (1, 4, 64, 48)
    torch.testing.assert_close(high, high_f.flip(-1), rtol=1e-4, atol=1e-4)


def test_keep_and_normalise_keeps_gt_classes_with_unit_max():
    cams = torch.rand(4, 8, 8) * 5
    kept, keys = keep_and_normalise(cams, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert keys.tolist() == [2, 4]
    assert torch.allclose(kept.flatten(1).amax(1), torch.ones(2), atol=1e-4)


def test_training_step_decreases_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = CAMClassifier(tiny_net(), lr=0.05, head_lr_mult=10, momentum=0.9)
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


def test_momentum_quirk_is_explicit():
    assert CAMClassifier(tiny_net(), irnet_momentum_quirk=True).effective_momentum == 1e-4
    assert CAMClassifier(tiny_net(), momentum=0.9).effective_momentum == 0.9


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
