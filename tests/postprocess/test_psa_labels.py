import numpy as np
import pytest
import torch

from src.postprocess import psa_labels
from src.postprocess.path_index import get_path_index
from src.postprocess.psa_labels import (
    background_score,
    combine_crf_labels,
    make_psa_label,
    pair_inside,
    psa_label_from_rw,
    random_walk_affinity,
    random_walk_affinity_batch,
    walk_input,
)
from src.postprocess.random_walk import _pair_affinity, random_walk


# -- labels from two CRF powers -----------------------------------------------------------------
def test_background_score_by_hand():
    cams = np.array([[[0.5, 0.0, 0.1]], [[0.2, 1.0, 1.001]]], np.float32)  # (K=2, 1, 3)
    # 1 - max = 0.5, 0, -0.001 -> clipped to 0 (no negative or NaN score from float16 overshoot)
    assert np.allclose(background_score(cams, 2), [[0.25, 0.0, 0.0]])
    assert np.isfinite(background_score(cams, 0.5)).all()
    assert np.array_equal(background_score(np.zeros((0, 2, 2)), 4), np.ones((2, 2)))


def test_combine_crf_labels_follows_psa():
    low = np.array([[0, 2, 3], [0, 2, 0]])
    high = np.array([[0, 0, 3], [2, 2, 0]])
    # low fg -> its class; low bg -> 255; high bg -> 0, applied last (also over low fg).
    assert combine_crf_labels(low, high).tolist() == [[0, 0, 3], [255, 2, 0]]


def test_make_psa_label_with_the_crf_off(monkeypatch):
    # Identity "CRF": the label is decided by the scores alone.
    monkeypatch.setattr(psa_labels, "crf_probs", lambda image, probs, params: probs)
    image = np.zeros((1, 4, 3), np.uint8)
    # max CAM 0.9 / 0.2 / 0.01 / 0.9 (class 5 wins the last pixel)
    cams = np.array([[[0.9, 0.2, 0.01, 0.1]], [[0.1, 0.0, 0.0, 0.9]]], np.float32)
    label = make_psa_label(image, cams, [2, 5], low_alpha=4, high_alpha=32)
    # 0.9: bg 0.1^4 < 0.9 -> fg. 0.2: low bg 0.8^4 = 0.41 wins -> 255, high 0.8^32 < 0.2 keeps
    # it unsure. 0.01: high bg 0.99^32 = 0.72 wins -> 0.
    assert label.dtype == np.uint8 and label.tolist() == [[2, 255, 0, 5]]


def test_make_psa_label_without_classes_is_background():
    label = make_psa_label(np.zeros((3, 3, 3), np.uint8), np.zeros((0, 3, 3)), [])
    assert np.array_equal(label, np.zeros((3, 3), np.uint8))


def test_make_psa_label_checks_inputs():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="keys"):
        make_psa_label(image, np.zeros((2, 4, 4)), [1])
    with pytest.raises(ValueError, match="NaN"):
        make_psa_label(image, np.full((1, 4, 4), np.nan), [1])
    with pytest.raises(ValueError, match="image size"):
        make_psa_label(image, np.zeros((1, 3, 4)), [1])


def test_make_psa_label_real_crf_smoke():
    image = np.full((32, 32, 3), 30, np.uint8)
    image[8:24, 8:24] = 220  # a bright square on a dark background
    yy, xx = np.mgrid[:32, :32]
    cam = np.exp(-((yy - 16.0) ** 2 + (xx - 16.0) ** 2) / 60.0).astype(np.float32)[None]
    label = make_psa_label(image, cam / cam.max(), [3])
    assert label.shape == (32, 32) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 3, 255}
    assert label[16, 16] == 3 and label[0, 0] == 0


# -- the walk ---------------------------------------------------------------------------------
def test_walk_input_pools_with_psa_padding():
    high_res = np.full((1, 10, 10), 0.5, np.float32)
    x = walk_input(high_res, alpha=1, stride=8)
    assert x.shape == (2, 2, 2)  # background + 1 class on the ceil(10/8) grid
    # Zero padding to 16x16 counts in the average: 8x8 real pixels, 8x2, 2x8, 2x2.
    expected = 0.5 * np.array([[64, 16], [16, 4]]) / 64
    assert np.allclose(x[1], expected) and np.allclose(x[0], expected)  # bg (1 - 0.5)^1


def _random_aff(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    d = get_path_index(5).num_directions
    return torch.rand(d, h, w, generator=g) * pair_inside(h, w, 5)


def _dense_transition(aff, beta, radius=5):
    """PSA infer_aff's dense T (test reference only): symmetric a, ones on the diagonal, ^beta,
    normalised over dim 0."""
    d, h, w = aff.shape
    a = torch.eye(h * w, dtype=torch.float64)
    for i, (dy, dx) in enumerate(get_path_index(radius).directions.tolist()):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    p, q = y * w + x, (y + dy) * w + x + dx
                    a[p, q] = a[q, p] = aff[i, y, x].double()
    a = a**beta
    return a / a.sum(dim=0, keepdim=True)


def test_walk_equals_psa_dense_transition():
    h, w, beta, logt = 6, 7, 8, 2
    aff = _random_aff(h, w, 0) ** 0.1  # mostly high affinities: the walk spreads
    trans = _dense_transition(aff, beta)
    assert torch.allclose(trans.sum(dim=0), torch.ones(h * w, dtype=torch.float64))
    cams = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))
    dense = cams.double().reshape(3, -1) @ torch.linalg.matrix_power(trans, 2**logt)
    rw = random_walk_affinity(cams, aff, beta=beta, logt=logt)
    assert rw.dtype == torch.float32 and rw.shape == (3, h, w)
    assert (rw.double() - dense.view(3, h, w)).abs().max() < 1e-5


def test_walk_with_no_affinity_keeps_the_cams():
    cams = torch.rand(2, 5, 9)
    aff = torch.zeros(get_path_index(5).num_directions, 5, 9)  # T = identity
    assert torch.equal(random_walk_affinity(cams, aff, logt=3), cams)


def test_walk_keeps_a_constant_map():
    # Column-stochastic T: every output is a weighted average of the inputs.
    cams = torch.full((1, 9, 11), 0.7)
    rw = random_walk_affinity(cams, _random_aff(9, 11, 2), logt=4)
    assert torch.allclose(rw, cams, atol=1e-6)


def test_walk_ignores_affinities_leaving_the_grid():
    aff = torch.ones(get_path_index(5).num_directions, 6, 10)  # also "pairs" off the grid
    cams = torch.full((1, 6, 10), 0.3)
    assert torch.allclose(random_walk_affinity(cams, aff, logt=3), cams, atol=1e-6)


def test_walk_is_the_project_walk_on_boundary_affinities():
    # The copy of random_walk's loop agrees with it when the affinity comes from a boundary.
    g = torch.Generator().manual_seed(3)
    cams, boundary = torch.rand(2, 10, 12, generator=g), torch.rand(10, 12, generator=g) ** 3
    ours = random_walk_affinity(cams * (1 - boundary), _pair_affinity(boundary, 5), beta=10, logt=4)
    assert (ours - random_walk(cams, boundary, beta=10, exp_times=4)).abs().max() < 1e-6


def test_batch_walk_equals_single_walks():
    affs = torch.stack([_random_aff(7, 9, 4), _random_aff(7, 9, 5)])
    cams = [torch.rand(3, 7, 9), torch.rand(2, 7, 9)]
    batch = random_walk_affinity_batch(cams, affs, logt=3)
    for cam, aff, rw in zip(cams, affs, batch, strict=True):
        assert torch.allclose(rw, random_walk_affinity(cam, aff, logt=3), atol=1e-6)


def test_label_from_rw_by_hand():
    rw = torch.zeros(3, 2, 2)
    rw[0, 0, 0] = rw[1, 0, 1] = rw[2, 1, :] = 1.0  # bg top-left, class 4 top-right, 9 bottom
    label = psa_label_from_rw(rw, [4, 9], (12, 16), stride=8)
    assert label.shape == (12, 16) and label.dtype == np.uint8
    assert label[0, 0] == 0 and label[0, 15] == 4 and label[11, 0] == 9
    with pytest.raises(ValueError, match="larger"):
        psa_label_from_rw(rw, [4, 9], (17, 16), stride=8)
