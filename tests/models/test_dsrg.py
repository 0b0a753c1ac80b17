"""DSRG region growing and balanced seeding loss on hand-made grids whose answer is visible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.models.dsrg import (
    balanced_seeding_loss,
    candidate_labels,
    grow_batch,
    growth_stats,
    region_grow,
    seed_share,
)

LOW = 0.5  # a peak below both thresholds: never a candidate


def make_probs(label_map: list[list[int]] | np.ndarray, peak, num_classes: int) -> np.ndarray:
    """(C, h, w) probabilities: each pixel gives its labelled class ``peak`` (scalar or map) and
    shares the rest evenly, so the argmax and its value are readable off the grid."""
    label_map = np.asarray(label_map)
    peak = np.broadcast_to(np.asarray(peak, dtype=float), label_map.shape)
    probs = np.repeat(((1 - peak) / (num_classes - 1))[None], num_classes, 0)
    for c in range(num_classes):
        probs[c][label_map == c] = peak[label_map == c]
    return probs


def make_seeds(shape: tuple[int, int], num_classes: int, cues: dict[int, list]) -> np.ndarray:
    """(C, h, w) bool cues from {class: [(y, x), ...]}."""
    seeds = np.zeros((num_classes, *shape), dtype=bool)
    for c, points in cues.items():
        for y, x in points:
            seeds[c, y, x] = True
    return seeds


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(y), int(x)) for y, x in zip(*np.nonzero(mask), strict=True)}


def test_anchored_component_grows_unanchored_does_not():
    # two confident class-1 blocks separated by unconfident background; only the left one holds a
    # class-1 seed, so only it is added
    labels = np.zeros((5, 7), dtype=int)
    peak = np.full((5, 7), LOW)
    labels[1:4, 0:3] = 1
    peak[1:4, 0:3] = 0.95
    labels[1:4, 5:7] = 1
    peak[1:4, 5:7] = 0.95
    seeds = make_seeds((5, 7), 2, {1: [(2, 1)]})
    grown = region_grow(make_probs(labels, peak, 2), seeds, np.array([True, True]))
    expected = np.zeros((5, 7), dtype=bool)
    expected[1:4, 0:3] = True
    np.testing.assert_array_equal(grown[1], expected)
    assert not grown[0].any()


def test_unconfident_seed_anchors_a_touching_component():
    # the seed itself is not confident: it still belongs to its class's region map, so the
    # confident block next to it (not containing it) grows
    labels = np.zeros((3, 5), dtype=int)
    peak = np.full((3, 5), LOW)
    labels[:, 2:5] = 1
    peak[:, 2:5] = 0.9
    seeds = make_seeds((3, 5), 2, {1: [(1, 1)]})
    grown = region_grow(make_probs(labels, peak, 2), seeds, np.array([True, True]))
    assert pixels(grown[1]) == {(1, 1)} | {(y, x) for y in range(3) for x in range(2, 5)}


def corridor() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row 1 is confidently class 1 end to end; rows 0 and 2 are unconfident. A class-1 seed sits
    at the left end and a class-2 seed sits in the middle of the corridor at (1, 3)."""
    labels = np.zeros((3, 7), dtype=int)
    peak = np.full((3, 7), LOW)
    labels[1] = 1
    peak[1] = 0.95
    seeds = make_seeds((3, 7), 3, {1: [(1, 0)], 2: [(1, 3)]})
    return make_probs(labels, peak, 3), seeds, np.array([True, True, True])


def test_seed_of_other_class_blocks_growth():
    probs, seeds, present = corridor()
    grown = region_grow(probs, seeds, present)
    assert pixels(grown[1]) == {(1, 0), (1, 1), (1, 2)}
    assert pixels(grown[2]) == {(1, 3)}


def test_official_code_mode_excludes_but_does_not_cut():
    # speedinghzl/DSRG labels components before dropping other-class seeds: the far side grows
    probs, seeds, present = corridor()
    grown = region_grow(probs, seeds, present, cut_at_other_seeds=False)
    assert pixels(grown[1]) == {(1, x) for x in range(7)} - {(1, 3)}
    assert pixels(grown[2]) == {(1, 3)}


def test_diagonal_contact_counts():
    # a diagonal chain touches the seed only corner to corner: 8-connectivity grows all of it
    labels = np.zeros((4, 4), dtype=int)
    peak = np.full((4, 4), LOW)
    for i in (1, 2, 3):
        labels[i, i] = 1
        peak[i, i] = 0.9
    seeds = make_seeds((4, 4), 2, {1: [(0, 0)]})
    grown = region_grow(make_probs(labels, peak, 2), seeds, np.array([True, True]))
    assert pixels(grown[1]) == {(0, 0), (1, 1), (2, 2), (3, 3)}


@pytest.mark.parametrize(
    ("cls", "peak", "kwargs", "grows"),
    [
        (1, 0.90, {}, True),  # foreground needs > 0.85
        (1, 0.85, {}, False),  # strict comparison
        (0, 0.90, {}, False),  # background needs > 0.99
        (0, 0.995, {}, True),
        (0, 0.90, {"bg_threshold": 0.8}, True),  # thresholds are honoured, not hard-coded
        (1, 0.90, {"fg_threshold": 0.95}, False),
    ],
)
def test_background_and_foreground_thresholds(cls: int, peak: float, kwargs: dict, grows: bool):
    # pixel 0 is an unconfident seed of ``cls``; pixel 1 has ``cls`` as argmax at ``peak``
    probs = make_probs([[0, cls]], [[LOW, peak]], 2)
    seeds = make_seeds((1, 2), 2, {cls: [(0, 0)]})
    grown = region_grow(probs, seeds, np.array([True, True]), **kwargs)
    assert bool(grown[cls, 0, 1]) is grows
    assert not grown[1 - cls, 0, 1]


def test_absent_class_never_grows_but_keeps_its_seeds():
    probs = make_probs([[2, 2, 2]], 0.97, 3)
    seeds = make_seeds((1, 3), 3, {2: [(0, 0)]})
    grown = region_grow(probs, seeds, np.array([True, True, False]))
    np.testing.assert_array_equal(grown, seeds)


def test_argmax_only_over_present_classes():
    # pixel 1: absent class 2 at 0.6 beats class 1 at 0.35; with fg_threshold 0.3 it grows into
    # class 1 only if the argmax ignores class 2
    probs = np.zeros((3, 1, 2))
    probs[:, 0, 0] = (0.9, 0.05, 0.05)
    probs[:, 0, 1] = (0.05, 0.35, 0.6)
    seeds = make_seeds((1, 2), 3, {1: [(0, 0)]})
    present = np.array([True, True, False])
    assert candidate_labels(probs, present, 0.99, 0.3)[0, 1] == 1
    grown = region_grow(probs, seeds, present, fg_threshold=0.3)
    assert grown[1, 0, 1] and not grown[2].any()
    everyone = region_grow(probs, seeds, np.array([True, True, True]), fg_threshold=0.3)
    assert not everyone[1, 0, 1] and not everyone[2].any()  # class 2 wins, has no seed


def test_background_forced_present():
    probs = make_probs([[0, 0]], 0.999, 2)
    seeds = make_seeds((1, 2), 2, {0: [(0, 0)]})
    grown = region_grow(probs, seeds, np.array([False, False]))
    assert grown[0].all()


def random_case(seed: int, num_classes: int = 4, size: int = 12):
    """Smooth-ish random CRF output with sparse cues, so some growth actually happens."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_classes, size // 3, size // 3)) * 6
    logits = logits.repeat(3, 1).repeat(3, 2)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    seeds = rng.random((num_classes, size, size)) < 0.04
    present = rng.random(num_classes) < 0.7
    return probs, seeds, present


def test_superset_no_accumulation_and_inputs_untouched():
    total_growth = 0
    for s in range(5):
        probs, seeds, present = random_case(s)
        before = seeds.copy()
        grown = region_grow(probs, seeds, present)
        np.testing.assert_array_equal(seeds, before)
        assert (grown | seeds == grown).all()
        np.testing.assert_array_equal(region_grow(probs, seeds, present), grown)
        new = grown & ~seeds
        assert new.sum(0).max(initial=0) <= 1  # a new pixel joins one class at most
        total_growth += int(new.sum())
    assert total_growth > 0  # the cases are not vacuous


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probs": np.zeros((4, 4))}, "probs"),
        ({"seeds": np.zeros((2, 4, 5), dtype=bool)}, "seeds"),
        ({"present": np.ones(3, dtype=bool)}, "present"),
        ({"bg_threshold": 1.5}, "bg_threshold"),
        ({"fg_threshold": -0.1}, "fg_threshold"),
    ],
)
def test_region_grow_validates(kwargs: dict, match: str):
    args = {
        "probs": np.full((2, 4, 4), 0.5),
        "seeds": np.zeros((2, 4, 4), dtype=bool),
        "present": np.ones(2, dtype=bool),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        region_grow(**args)


def test_grow_batch_matches_per_image():
    cases = [random_case(s) for s in range(3)]
    probs = torch.tensor(np.stack([c[0] for c in cases]), dtype=torch.float32, requires_grad=True)
    seeds = torch.from_numpy(np.stack([c[1] for c in cases]))
    labels = torch.from_numpy(np.stack([c[2] for c in cases])).float()
    grown = grow_batch(probs, seeds, labels)
    assert grown.dtype == torch.bool and grown.device == probs.device
    assert not grown.requires_grad
    for i, (_, s, present) in enumerate(cases):
        expected = region_grow(probs[i].detach().numpy(), s, present)
        np.testing.assert_array_equal(grown[i].numpy(), expected)


def test_grow_batch_rejects_labels_without_background_column():
    probs = torch.full((1, 3, 4, 4), 1 / 3)
    with pytest.raises(ValueError, match="labels"):
        grow_batch(probs, torch.zeros(1, 3, 4, 4, dtype=torch.bool), torch.ones(1, 2))


def test_balanced_loss_by_hand():
    p_bg = torch.tensor([[[0.9, 0.6], [0.2, 0.3]], [[0.5, 0.7], [0.4, 0.1]]])
    probs = torch.stack([p_bg, 1 - p_bg], 1).requires_grad_()
    seeds = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    seeds[0, 0, 0, 0] = seeds[0, 0, 0, 1] = True  # image 0: two bg seeds ...
    seeds[0, 1, 1, 0] = True  # ... and one fg seed
    seeds[1, 0, 0, 0] = True  # image 1: one bg seed, no fg seeds
    image0 = -(math.log(0.9) + math.log(0.6)) / 2 - math.log(0.8)
    image1 = -math.log(0.5)
    loss = balanced_seeding_loss(probs, seeds)
    assert loss.item() == pytest.approx((image0 + image1) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(probs.grad).all()
    assert (probs.grad[~seeds] == 0).all()


def test_balanced_loss_counts_each_term_on_its_own():
    # 1 bg seed vs 3 fg seeds: an unbalanced mean would weight them 1:3, DSRG weights 1:1
    probs = torch.full((1, 2, 2, 2), 0.5)
    probs[0, 0, 0, 0], probs[0, 1, 0, 0] = 0.25, 0.75
    seeds = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    seeds[0, 0, 0, 0] = True
    seeds[0, 1, 0, 1] = seeds[0, 1, 1, 0] = seeds[0, 1, 1, 1] = True
    expected = -math.log(0.25) - math.log(0.5)
    assert balanced_seeding_loss(probs, seeds).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_loss_no_seeds_and_zero_probs_off_seeds_are_finite():
    probs = torch.zeros(2, 3, 2, 2)
    probs[:, 0] = 1.0  # log(0) everywhere except background
    seeds = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    seeds[0, 0, 0, 0] = True
    probs.requires_grad_()
    loss = balanced_seeding_loss(probs, seeds)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(probs.grad).all()


def test_balanced_loss_validates_seeds_shape():
    with pytest.raises(ValueError, match="seeds"):
        balanced_seeding_loss(torch.full((1, 2, 2, 2), 0.5), torch.zeros(1, 2, 2, 3))


def test_growth_stats_shares():
    seeds = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    seeds[0, 1, 0, 0] = True
    grown = seeds.clone()
    grown[0, 0, 1, :] = True
    grown[0, 2, 0, 1] = True
    assert seed_share(seeds).tolist() == [0.25]
    stats = growth_stats(seeds, grown)
    assert stats == {"seeded_before": 0.25, "seeded_after": 1.0, "bg_after": 0.5, "fg_after": 0.5}
