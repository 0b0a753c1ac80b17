import numpy as np
import torch

from src.models.affinity import AffinityModule, AffinityNet, affinity_labels, relation_losses
from src.models.backbone import ResNetBackbone
from src.pipeline.stages.affinity import collate_with_cams
from src.postprocess.path_index import get_path_index
from src.postprocess.random_walk import random_walk_batch


def tiny_affinity(strides=(2, 2, 1, 1)):
    backbone = ResNetBackbone(arch="resnet_tiny", strides=strides, norm="train", frozen_stages=0)
    return AffinityNet(backbone, edge_width=8, dp_width=32)


def test_outputs_at_stride_4_and_backbone_frozen():
    for strides in [(2, 2, 1, 1), (2, 2, 2, 1)]:
        net = tiny_affinity(strides).train()
        edge, dp = net(torch.randn(2, 3, 96, 96))
        assert edge.shape == (2, 1, 24, 24) and dp.shape == (2, 2, 24, 24)
        assert not any(p.requires_grad for p in net.backbone.parameters())
        assert not net.backbone.training


def test_affinity_labels_split_pairs_by_label():
    label = torch.zeros(1, 24, 24, dtype=torch.long)
    label[:, 8:16, 8:16] = 2
    label[:, 0:2] = 255
    bg_pos, fg_pos, neg = affinity_labels(label, radius=10, num_classes=3)
    n_pairs = get_path_index(10).num_directions * get_path_index(10).pairs(24, 24).src.numel()
    assert bg_pos.shape == (1, get_path_index(10).num_directions, n_pairs // 152)
    total = bg_pos + fg_pos + neg
    assert total.max() == 1  # each pair is in at most one set
    assert fg_pos.sum() > 0 and neg.sum() > 0 and bg_pos.sum() > 0


def test_relation_losses_train_the_heads():
    torch.manual_seed(0)
    net = tiny_affinity()
    label = torch.zeros(2, 24, 24, dtype=torch.long)
    label[:, 6:18, 6:18] = 1
    image = torch.randn(2, 3, 96, 96)
    opt = torch.optim.SGD([p for m in net.heads() for p in m.parameters()], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        edge, dp = net(image)
        loss = relation_losses(edge, dp, label, radius=10, num_classes=2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_predict_step_gives_labels_from_the_image_classes():
    module = AffinityModule(tiny_affinity(), num_classes=7, exp_times=3).eval()
    batch = {
        "id": ["a", "b"],
        "image": torch.randn(2, 3, 64, 64),
        "size": torch.tensor([[64, 64], [64, 64]]),
        "cam": [torch.rand(2, 16, 16), torch.rand(1, 16, 16)],
        "keys": [np.array([2, 5]), np.array([3])],
    }
    with torch.no_grad():
        items = module.predict_step(batch, 0)
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0]["mask"].shape == (64, 64) and items[0]["mask"].dtype == np.uint8
    assert set(np.unique(items[0]["mask"])) <= {0, 2, 5}
    assert set(np.unique(items[1]["mask"])) <= {0, 3}


def walk_sample(image_id: str, h: int, w: int, keys: list[int], stride: int, bg: int = 0) -> dict:
    grid = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    return {
        "id": image_id,
        "image": torch.randn(3, h, w),
        "mask": torch.zeros(h, w, dtype=torch.long),  # ragged too: must not reach the stack
        "label": torch.zeros(6),
        "size": torch.tensor([h, w]),
        "cam": torch.rand(len(keys) + bg, *grid),
        "keys": np.array(keys),
    }


def test_a_batch_of_images_of_different_sizes_labels_each_as_alone():
    # VOC's varying sizes: the net sees each image alone, the walk takes them all at once.
    torch.manual_seed(0)
    module = AffinityModule(tiny_affinity(), num_classes=7, exp_times=4).eval()
    samples = [
        walk_sample("a", 64, 64, [2, 5], 4),
        walk_sample("b", 52, 76, [3], 4),
        walk_sample("c", 70, 40, [1, 4, 6], 4),
    ]
    batch = collate_with_cams([dict(s) for s in samples])
    assert isinstance(batch["image"], list) and isinstance(batch["mask"], list)
    assert batch["label"].shape == (3, 6) and batch["id"] == ["a", "b", "c"]
    with torch.no_grad():
        together = module.predict_step(batch, 0)
        alone = [module.predict_step(collate_with_cams([dict(s)]), 0)[0] for s in samples]
    for t, a in zip(together, alone, strict=True):
        assert t["id"] == a["id"] and np.array_equal(t["mask"], a["mask"])


def test_the_walk_gets_float32_cams_under_bf16_autocast(monkeypatch):
    # trainer=gpu predicts under bf16-mixed: the boundaries come out bf16, the CAMs must not.
    seen = []

    def spy(cams, boundaries, **kwargs):
        seen.extend(c.dtype for c in cams)
        return random_walk_batch(cams, boundaries, **kwargs)

    monkeypatch.setattr("src.models.affinity.random_walk_batch", spy)
    module = AffinityModule(tiny_affinity(), num_classes=7, exp_times=2).eval()
    batch = collate_with_cams([walk_sample("a", 64, 64, [2], 4), walk_sample("b", 48, 64, [3], 4)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        module.predict_step(batch, 0)
    assert seen == [torch.float32, torch.float32]
