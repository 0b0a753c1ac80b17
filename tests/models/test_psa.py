import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.models.affinity import affinity_labels
from src.models.backbone import ResNetBackbone
from src.models.optim import sgd
from src.models.psa import (
    PSAAffinityModule,
    PSAAffinityNet,
    pair_affinity,
    psa_losses,
    source_pairs,
)
from src.pipeline.stages.affinity import collate_with_cams
from src.postprocess.path_index import get_path_index
from tests.models.test_affinity import walk_sample


def tiny_psa(frozen_stages=1):
    backbone = ResNetBackbone(
        arch="resnet_tiny", strides=(2, 2, 1, 1), norm="frozen", frozen_stages=frozen_stages
    )
    return PSAAffinityNet(backbone, widths=(8, 8, 16))


def test_features_at_stride_8_and_the_backbone_fine_tunes():
    net = tiny_psa().train()
    assert net(torch.randn(2, 3, 96, 80)).shape == (2, 32, 12, 10)
    assert not any(p.requires_grad for p in net.backbone.stage1.parameters())
    assert all(p.requires_grad for p in net.backbone.stage4.parameters())
    with pytest.raises(ValueError, match="output stride 8"):
        PSAAffinityNet(ResNetBackbone(arch="resnet_tiny", strides=(2, 2, 2, 1), norm="train"))


def test_pair_labels_on_a_hand_made_grid():
    # Radius 2: directions (0,1), (1,-1), (1,0), (1,1); on a 3x3 grid the sources are (0,1), (1,1).
    label = torch.tensor([[[0, 0, 1], [0, 1, 1], [255, 1, 2]]])
    bg_pos, fg_pos, neg = affinity_labels(label, radius=2, num_classes=3)
    by_hand = {  # direction: (pair from (0,1)=0, pair from (1,1)=1); ign = touches 255
        (0, 1): ("neg", "fg"),  # 0-1, 1-1
        (1, -1): ("bg", "ign"),  # 0-0, 1-255
        (1, 0): ("neg", "fg"),  # 0-1, 1-1
        (1, 1): ("neg", "neg"),  # 0-1, 1-2
    }
    directions = [tuple(d) for d in get_path_index(2).directions.tolist()]
    assert sorted(directions) == sorted(by_hand)
    for d, kinds in enumerate(by_hand[k] for k in directions):
        for s, kind in enumerate(kinds):
            got = (bg_pos[0, d, s].item(), fg_pos[0, d, s].item(), neg[0, d, s].item())
            want = tuple(float(kind == k) for k in ("bg", "fg", "neg"))
            assert got == want, (directions[d], s)


def test_loss_by_hand():
    aff = torch.tensor([[[0.5, 0.9], [0.25, 0.1]]])  # (B=1, D=2, S=2)
    bg = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    fg = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    neg = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    losses = psa_losses(aff, bg, fg, neg)
    bg_l, fg_l = -math.log(0.5), -math.log(0.9)
    neg_l = (-math.log(0.75) - math.log(0.9)) / 2  # averaged over its own 2 pairs
    assert losses["bg_pos"].item() == pytest.approx(bg_l, abs=1e-4)
    assert losses["fg_pos"].item() == pytest.approx(fg_l, abs=1e-4)
    assert losses["neg"].item() == pytest.approx(neg_l, abs=1e-4)
    assert losses["loss"].item() == pytest.approx(bg_l / 4 + fg_l / 4 + neg_l / 2, abs=1e-4)


def test_pair_affinity_by_hand_and_in_range():
    f = torch.zeros(1, 2, 6, 10)
    f[0, :, 0, 5] = torch.tensor([1.0, 3.0])  # |f_p - f_q| = (1, 3): mean 2
    aff = pair_affinity(f, radius=5)
    d = [tuple(x) for x in get_path_index(5).directions.tolist()].index((0, 1))
    assert aff[0, d, 0, 4].item() == pytest.approx(math.exp(-2))  # (0,4) -> (0,5)
    assert aff[0, d, 0, 0].item() == 1.0  # identical features
    assert aff[0, d, 0, 9].item() == 0.0  # (0,9) -> (0,10) leaves the grid
    g = pair_affinity(torch.randn(2, 4, 7, 11), radius=5)
    inside = g[g > 0]
    assert inside.numel() > 0 and inside.max() <= 1.0


def test_source_pairs_align_with_the_pair_index():
    f = torch.randn(1, 3, 8, 12)
    aff = source_pairs(pair_affinity(f, 5), 5)
    pairs = get_path_index(5).pairs(8, 12)
    flat = f.flatten(2)
    src = flat[:, :, pairs.src].unsqueeze(2)  # (1, C, 1, S)
    dst = flat[:, :, pairs.dst]  # (1, C, D, S)
    assert torch.allclose(aff, torch.exp(-(src - dst).abs().mean(dim=1)), atol=1e-6)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    module = PSAAffinityModule(tiny_psa(), num_classes=3)
    label = torch.zeros(2, 48, 80, dtype=torch.long)  # a 6x10 grid: sources need h > 4, w > 8
    label[:, 16:40, 24:56] = 1
    label[:, :8] = 255
    batch = {"image": torch.randn(2, 3, 48, 80), "ir_label": label}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = module._losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_optimiser_puts_the_head_at_10x():
    module = PSAAffinityModule(
        tiny_psa(),
        num_classes=3,
        optimizer=partial(sgd, lr=0.1, momentum=0.9, weight_decay=5e-4, irnet_momentum_quirk=True),
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(1.0)]
    # PSA's / SEAM's PolyOptimizer: SGD(params, lr, weight_decay) makes momentum the decay.
    assert opt.param_groups[0]["momentum"] == 5e-4
    head = {id(p) for m in module.net.heads() for p in m.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head


def test_predict_step_gives_labels_from_the_image_classes():
    module = PSAAffinityModule(tiny_psa(), num_classes=7, logt=3).eval()
    batch = {
        "id": ["a", "b"],
        "image": torch.randn(2, 3, 60, 70),  # padded to 64x72: a 8x9 grid
        "size": torch.tensor([[60, 70], [60, 70]]),
        "cam": [torch.rand(3, 8, 9), torch.rand(2, 8, 9)],
        "keys": [np.array([2, 5]), np.array([3])],
    }
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0]["mask"].shape == (60, 70) and items[0]["mask"].dtype == np.uint8
    assert set(np.unique(items[0]["mask"])) <= {0, 2, 5}
    assert set(np.unique(items[1]["mask"])) <= {0, 3}
    batch["cam"][1] = torch.rand(2, 7, 9)
    with pytest.raises(ValueError, match="grid"), torch.no_grad():
        module.predict_step(batch, 0)


def test_a_batch_of_images_of_different_sizes_labels_each_as_alone():
    torch.manual_seed(0)
    module = PSAAffinityModule(tiny_psa(), num_classes=7, logt=3).eval()
    # (1 + K) walk channels on the stride-8 grid: the background first.
    samples = [
        walk_sample("a", 60, 70, [2, 5], 8, bg=1),
        walk_sample("b", 48, 90, [3], 8, bg=1),
        walk_sample("c", 75, 41, [1, 4, 6], 8, bg=1),
    ]
    batch = collate_with_cams([dict(s) for s in samples])
    with torch.no_grad():
        together = module.predict_step(batch, 0)
        alone = [module.predict_step(collate_with_cams([dict(s)]), 0)[0] for s in samples]
    for t, a in zip(together, alone, strict=True):
        assert t["id"] == a["id"] and np.array_equal(t["mask"], a["mask"])
