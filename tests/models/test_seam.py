from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.datamodules.transforms import frame_grid
from src.models.backbone import ResNetBackbone
from src.models.cam import CAMNet, multiscale_cams
from src.models.context import ContextModule
from src.models.optim import sgd
from src.models.seam import (
    SEAMClassifier,
    SEAMNet,
    SEAMOutput,
    affinity,
    ecr_loss,
    max_norm,
    pcm_input,
    propagate,
)

CTX = (8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny: one thread is ~100x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def os8_backbone():
    """The tiny ResNet at output stride 8, as SEAM runs (widths 32/64/128/256)."""
    return ResNetBackbone(
        arch="resnet_tiny",
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        norm="train",
        frozen_stages=0,
    )


def tiny_context(num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, num_classes + 1).view(-1, 1, 1) / num_classes
    centers = torch.rand(num_classes, *CTX, generator=g) * scale
    return ContextModule(centers, torch.full((num_classes,), 1 / num_classes))


def seam_net(context=False, **kwargs):
    ctx = tiny_context() if context else None
    return SEAMNet(os8_backbone(), num_classes=4, context=ctx, **kwargs)


def context_inputs(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    frame = torch.from_numpy(frame_grid(height, width)).permute(2, 0, 1)
    return torch.rand(batch, *CTX, generator=g), frame[None].repeat(batch, 1, 1, 1)


def make_batch(batch=4, size=32, context=False):
    out = {
        "id": [f"i{k}" for k in range(batch)],
        "image": torch.randn(batch, 3, size, size),
        "label": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]] * (batch // 2)),
    }
    if context:
        out["context_mask"], out["frame"] = context_inputs(batch, size, size)
    return out


# ------------------------------------------------------------------------------- the net


def test_outputs_have_seam_shapes_and_logits_are_gap_of_cam():
    torch.manual_seed(0)
    net = seam_net().eval()
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        out = net.seam_outputs(x)
        logits, cam = net(x), net.cam(x)
    assert out.logits.shape == (2, 4) and logits.shape == (2, 4)
    assert out.cam.shape == (2, 4, 4, 3)  # output stride 8
    assert out.cam_rv.shape == (2, 5, 4, 3)  # + background channel 0
    assert cam.shape == (2, 4, 4, 3) and (cam >= 0).all()
    torch.testing.assert_close(logits, out.cam.mean(dim=(2, 3)))
    torch.testing.assert_close(cam, out.cam_rv[:, 1:].relu())
    # cam() is the PCM output, not the raw CAM.
    assert not torch.allclose(cam, out.cam.relu(), atol=1e-3)


def test_features_return_stages_keeps_the_features_bit_identical():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    mask, frame = context_inputs(2, 32, 32)
    for net, args in ((CAMNet(os8_backbone(), 4), ()), (seam_net(context=True), (mask, frame))):
        net.eval()
        with torch.no_grad():
            feats, stages = net.features(x, *args, return_stages=True)
            assert torch.equal(feats, net.features(x, *args))
        assert [s.shape[1] for s in stages] == net.backbone.out_channels
        assert torch.equal(stages[-1], feats[:, : net.backbone.out_channels[-1]])


def test_pcm_widths_follow_seam_ratio_and_stages_are_configurable():
    net = seam_net()
    # layer2 (64) and layer3 (128) / 8, as SEAM's 512 -> 64 and 1024 -> 128.
    assert [c.out_channels for c in net.pcm_convs] == [8, 16]
    assert net.pcm_proj.in_channels == 3 + 24 and net.pcm_proj.out_channels == 24
    other = seam_net(pcm_stages=("layer3", "layer4"))
    assert [c.in_channels for c in other.pcm_convs] == [128, 256]
    x = torch.randn(1, 3, 32, 32)
    assert other.cam(x).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="pcm_stages"):
        seam_net(pcm_stages=("conv5",))


def test_affinity_columns_are_non_negative_and_sum_to_one():
    torch.manual_seed(0)
    aff = affinity(torch.randn(2, 6, 3, 4))
    assert aff.shape == (2, 12, 12)
    assert (aff >= 0).all()
    assert (aff == 0).any()  # negative cosines are cut by the ReLU
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 12), atol=1e-4, rtol=0)
    # On the net's own PCM features too.
    net = seam_net().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats, stages = net.features(x, return_stages=True)
        aff = affinity(net.pcm_features(x, stages, feats.shape[-2:]))
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(1, 16), atol=1e-4, rtol=0)


def test_propagation_on_2x2_grids_by_hand():
    cam = torch.tensor([[0.8, 0.2], [0.4, 0.0]]).view(1, 1, 2, 2)
    # Constant features: every cosine is 1, each column is 1/(4 + 1e-5), so every pixel gets
    # (0.8 + 0.2 + 0.4 + 0) / (4 + 1e-5) = 0.35 (to 1e-6).
    rv = propagate(cam, affinity(torch.full((1, 3, 2, 2), 2.0)))
    torch.testing.assert_close(rv, torch.full((1, 1, 2, 2), 0.35), atol=1e-5, rtol=0)
    # Top row along e1, bottom row along e2 (cosine 0 across): each row averages itself.
    f = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 1.0]]]).view(1, 2, 2, 2)
    rv = propagate(cam, affinity(f))
    torch.testing.assert_close(rv, torch.tensor([[0.5, 0.5], [0.2, 0.2]]).view(1, 1, 2, 2))


def test_constant_pcm_features_make_cam_rv_the_image_mean_of_the_pcm_input():
    """Through the net: f9 reading only a constant image channel gives constant PCM features,
    so cam_rv at every pixel is the spatial mean of the normalised CAM (x hw / (hw + 1e-5))."""
    torch.manual_seed(0)
    net = seam_net().eval()
    with torch.no_grad():
        net.pcm_proj.weight.zero_()
        net.pcm_proj.weight[:, 0] = 1.0
    x = torch.randn(1, 3, 32, 32)
    x[:, 0] = 0.7
    with torch.no_grad():
        out = net.seam_outputs(x)
    expected = pcm_input(out.cam).mean(dim=(2, 3), keepdim=True).expand_as(out.cam_rv)
    torch.testing.assert_close(out.cam_rv, expected, atol=1e-5, rtol=0)


def test_pcm_input_is_seams_normalised_max_onehot_cam_with_background():
    # Two classes at two pixels (plus one negative value, cut by the ReLU).
    cam = torch.tensor([[[2.0, 1.0]], [[-3.0, 4.0]]]).view(1, 2, 1, 2)
    d = pcm_input(cam)
    # class 1: [2, 1] / 2 -> [1, 0.5]; class 2: [0, 4] / 4 -> [0, 1]; bg = 1 - max = [0, 0];
    # then pixel 2 keeps class 2 only.
    ref = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]).view(1, 3, 1, 2)
    torch.testing.assert_close(d, ref, atol=1e-4, rtol=0)
    assert not d.requires_grad or d.grad_fn is None


def test_ecr_top_k_takes_int_of_the_fraction_of_all_entries():
    # 2 channels (bg + 1 class) x 2 x 3 = 12 entries with |diff| = 1 .. 12 / 12.
    target = (torch.arange(1.0, 13.0) / 12).view(1, 2, 2, 3)
    zero = torch.zeros_like(target)
    # 20 % of 12 = 2.4 -> k = 2 (SEAM: int(21 * h * w * 0.2)): mean of 12/12 and 11/12.
    torch.testing.assert_close(ecr_loss(zero, target, 0.2), torch.tensor(23 / 24))
    torch.testing.assert_close(ecr_loss(zero, target, 0.25), torch.tensor(11 / 12))  # k = 3
    # With two classes the target keeps only each pixel's max class: the 0.9 under the 1.0
    # drops to 0, so the top 2 of |target - 0| are 1.0 and 0.5 (not 1.0 and 0.9).
    two = torch.tensor([0.1, 0.2, 1.0, 0.0, 0.9, 0.5]).view(1, 3, 1, 2)
    torch.testing.assert_close(ecr_loss(torch.zeros_like(two), two, 0.4), torch.tensor(0.75))


def test_max_norm_is_seams_min_max_after_relu():
    cam = torch.tensor([[-1.0, 1.0, 3.0, 5.0], [1.0, 2.0, 3.0, 5.0]]).view(1, 2, 2, 2)
    # ReLU -> [0, 1, 3, 5] and [1, 2, 3, 5]; then (x - min - 1e-5) / (max - min + 1e-5).
    ref = torch.tensor([[0.0, 0.2, 0.6, 1.0], [0.0, 0.25, 0.5, 1.0]]).view(1, 2, 2, 2)
    torch.testing.assert_close(max_norm(cam), ref, atol=1e-5, rtol=0)


def test_pcm_features_are_f9_of_image_and_reduced_stages():
    torch.manual_seed(0)
    net = seam_net().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats, stages = net.features(x, return_stages=True)
        got = net.pcm_features(x, stages, (4, 4))
        f8_3 = F.relu(F.conv2d(stages[1], net.pcm_convs[0].weight))  # layer2
        f8_4 = F.relu(F.conv2d(stages[2], net.pcm_convs[1].weight))  # layer3
        x_s = F.interpolate(x, (4, 4), mode="bilinear", align_corners=True)
        ref = F.conv2d(torch.cat([x_s, f8_3, f8_4], 1), net.pcm_proj.weight)
    assert feats.shape[-2:] == (4, 4)
    torch.testing.assert_close(got, ref)


def test_context_map_reaches_the_seam_cam():
    torch.manual_seed(0)
    net = seam_net(context=True).eval()
    assert net.classifier.in_channels == net.backbone.out_channels[-1] + 1
    with torch.no_grad():  # make M, and the mask's effect on M, large enough to see
        net.classifier.weight[:, -1] = 5.0
        net.context.w1.weight.mul_(10)
        net.context.w2.weight.mul_(10)
    x = torch.randn(2, 3, 32, 32)
    mask, frame = context_inputs(2, 32, 32)
    with torch.no_grad():
        cam = net.cam(x, mask, frame)
        other = net.cam(x, 1 - mask, frame)
        dropped = net(x, mask, frame, drop_context=True)
    assert cam.shape == (2, 4, 4, 4)
    assert (cam - other).abs().max() > 1e-3
    assert (net(x, mask, frame) - dropped).abs().max() > 1e-3


def test_dropout_acts_on_backbone_channels_in_training_only():
    """SEAM's Dropout2d before fc8; a concatenated CONTA M channel is never dropped. With
    p = 1 every backbone channel is dropped, so only the M term w_M * M is left."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = seam_net(dropout=1.0)
    assert (net.train()(x) == 0).all()
    assert (net.eval()(x) != 0).all()
    net = seam_net(context=True, dropout=1.0).train()
    mask, frame = context_inputs(2, 32, 32)
    m = net.features(x, mask, frame)[:, -1:]
    w_m = net.classifier.weight[:, -1, 0, 0]
    torch.testing.assert_close(net(x, mask, frame), w_m * m.mean(dim=(2, 3)))
    assert (w_m != 0).all() and (m != 0).any()


def test_multiscale_cams_work_on_a_seam_net():
    torch.manual_seed(0)
    net = seam_net().eval()
    x = torch.randn(1, 3, 32, 24)

    def flipped_sum(img):  # net.cam of an image plus the flipped-back cam of its mirror
        return net.cam(img) + net.cam(img.flip(-1)).flip(-1)

    def up(t):
        return torch.nn.functional.interpolate(t, (32, 24), mode="bilinear")

    with torch.no_grad():
        strided, high = multiscale_cams(net, x, scales=(1.0, 0.5), flip=True)
        _, high_f = multiscale_cams(net, x.flip(-1), scales=(1.0, 0.5), flip=True)
        half = torch.nn.functional.interpolate(x, (16, 12), mode="bilinear")
        ref = up(flipped_sum(x)) + up(flipped_sum(half))
    assert strided.shape == (1, 4, 8, 6) and high.shape == (1, 4, 32, 24)
    assert (high >= 0).all() and high.amax() > 0
    # The sum over scales and flips of the PCM-refined maps (net.cam), flip-equivariant.
    torch.testing.assert_close(high, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(high, high_f.flip(-1), rtol=1e-4, atol=1e-4)
    net_ctx = seam_net(context=True).eval()
    mask, frame = context_inputs(2, 32, 24)
    with torch.no_grad():
        x2 = torch.randn(2, 3, 32, 24)
        strided, high = multiscale_cams(net_ctx, x2, (1.0, 0.5), True, mask, frame)
    assert strided.shape == (2, 4, 8, 6) and high.shape == (2, 4, 32, 24)


# ------------------------------------------------------------------------------ training


def test_training_step_logs_every_term_and_trains_pcm_and_backbone(monkeypatch):
    torch.manual_seed(0)
    module = SEAMClassifier(seam_net(), rescale=0.3)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: value}))
    loss = module.training_step(make_batch(), 0)
    assert torch.isfinite(loss)
    assert set(logged) == {
        f"train/{k}" for k in ("loss", "loss_cls", "loss_min", "loss_er", "loss_ecr")
    }
    assert all(v > 0 for v in logged.values())
    loss.backward()
    net = module.net
    for p in [*net.pcm_convs.parameters(), net.pcm_proj.weight, net.classifier.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert net.backbone.stage4[0].conv1.weight.grad.abs().sum() > 0


def test_ecr_trains_only_the_pcm_and_er_trains_the_backbone():
    """SEAM detaches the PCM's inputs (CAM, backbone features) and the ECR targets."""
    torch.manual_seed(0)
    module = SEAMClassifier(seam_net(dropout=0.0))
    losses = module.seam_losses(make_batch())
    net = module.net
    backbone_w = net.backbone.stage2[0].conv1.weight  # feeds both the CAM and the PCM
    g_bb, g_pcm = torch.autograd.grad(
        losses["loss_ecr"], [backbone_w, net.pcm_proj.weight], allow_unused=True
    )
    assert g_bb is None and g_pcm.abs().sum() > 0
    g_bb, g_pcm = torch.autograd.grad(
        losses["loss_er"], [backbone_w, net.pcm_proj.weight], allow_unused=True
    )
    assert g_bb.abs().sum() > 0 and g_pcm is None


def test_weights_scale_their_terms():
    torch.manual_seed(0)
    batch = make_batch()
    net = seam_net(dropout=0.0)
    base = SEAMClassifier(net).seam_losses(batch)
    off = SEAMClassifier(net, er_weight=0, ecr_weight=2, min_pool_weight=0).seam_losses(batch)
    expected = base["loss_cls"] + 2 * base["loss_ecr"]
    torch.testing.assert_close(off["loss"], expected)


def test_losses_by_hand_on_prescribed_branch_outputs(monkeypatch):
    """Class 1 present, class 2 absent (its maps are masked out). Branch 1's class-1 CAM is a
    left-to-right ramp, branch 2's the mirror ramp, cam_rv = the CAM with its background.
    Upsampled (align_corners) and rescaled x0.5 both are the columns r = 0, .25, .5, .75, 1
    (class 1) and 1 - r (background) on the 5 x 5 grid of branch 2."""
    net = SEAMNet(os8_backbone(), num_classes=2)
    ramp = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    mirror = 1 - ramp
    outs = {  # keyed by input width: 10 (branch 1), 5 (branch 2)
        10: SEAMOutput(
            torch.zeros(1, 2), torch.cat([ramp, 5 * ramp], 1), torch.cat([mirror, ramp, ramp], 1)
        ),
        5: SEAMOutput(
            torch.zeros(1, 2), torch.cat([mirror, 5 * ramp], 1), torch.cat([ramp, mirror, ramp], 1)
        ),
    }
    monkeypatch.setattr(net, "seam_outputs", lambda x, **kw: outs[x.shape[-1]])
    module = SEAMClassifier(net, rescale=0.5, ecr_top=0.5)
    batch = {"image": torch.zeros(1, 3, 10, 10), "label": torch.tensor([[1.0, 0.0]])}
    losses = module.seam_losses(batch)
    # L_cls: soft margin at logit 0 is log 2 on both branches.
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(0.6931), atol=1e-4, rtol=0)
    # L_ER over both fg channels (the absent one 0): mean over columns of |r - (1 - r)|
    # = (1 + .5 + 0 + .5 + 1) / 5 = 0.6, halved: 0.3 (L2 would give 0.25).
    torch.testing.assert_close(losses["loss_er"], torch.tensor(0.3), atol=1e-3, rtol=0)
    # L_ECR, each direction cam_rv of one branch vs the other branch's CAM (pairing a branch
    # with itself gives 0): |2r - 1| on bg and class 1 = 20 ones, 20 halves, 10 zeros, plus 25
    # zeros of class 2; the top int(0.5 * 75) = 37 (20 ones, 17 halves) average 28.5 / 37;
    # two directions.
    torch.testing.assert_close(losses["loss_ecr"], torch.tensor(57 / 37), atol=1e-3, rtol=0)
    # L_min: lowest quarter of the raw fg cam_rv. Branch 1 on 10 x 10 (columns j / 9): 10 zeros,
    # 10 x 1/9, 5 x 2/9 -> (20/9) / 25; branch 2 on 5 x 5 (1 - r): 5 zeros, one 0.25 -> 0.25 / 6.
    expected = (20 / 9 / 25 + 0.25 / 6) / 2
    torch.testing.assert_close(losses["loss_min"], torch.tensor(expected), atol=1e-4, rtol=0)
    total = losses["loss_cls"] + losses["loss_min"] + losses["loss_er"] + losses["loss_ecr"]
    torch.testing.assert_close(losses["loss"], total)


def test_context_training_step_reaches_w1_w2_and_pcm():
    torch.manual_seed(0)
    module = SEAMClassifier(seam_net(context=True))
    losses = module.seam_losses(make_batch(context=True))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert module.net.context.w1.weight.grad.abs().sum() > 0
    assert module.net.pcm_proj.weight.grad.abs().sum() > 0


def test_pcm_parameters_are_in_the_head_group_and_hparams_are_saved():
    module = SEAMClassifier(
        seam_net(context=True), optimizer=partial(sgd, lr=0.1), head_lr_mult=10, ecr_top=0.3
    )
    pcm = [*module.net.pcm_convs.parameters(), *module.net.pcm_proj.parameters()]
    head_ids = set(map(id, module.net.head_parameters()))
    assert all(id(p) in head_ids for p in pcm)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    head = next(g for g in groups if g["lr"] == pytest.approx(1.0))
    assert all(id(p) in set(map(id, head["params"])) for p in pcm)
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert all_ids == {id(p) for p in module.parameters() if p.requires_grad}
    hp = module.hparams
    assert (hp.head_lr_mult, hp.ecr_top, hp.rescale, hp.er_weight) == (10, 0.3, 0.3, 1.0)


def test_predict_and_validation_are_inherited():
    torch.manual_seed(0)
    module = SEAMClassifier(seam_net(), scales=(1.0,), flip=False).eval()
    batch = make_batch(batch=2)
    with torch.no_grad():
        items = module.predict_step(batch, 0)
        module.validation_step(batch, 0)
    assert items[0]["keys"].tolist() == [1, 4] and items[0]["cam"].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="rescale"):
        SEAMClassifier(seam_net(), rescale=1.5)
