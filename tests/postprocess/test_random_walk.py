import math

import numpy as np
import pytest
import torch

from src.postprocess.random_walk import pseudo_label_from_rw, random_walk, random_walk_dense


def _inputs(c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(c, h, w, generator=g)
    boundary = torch.rand(h, w, generator=g) ** 3  # mostly low, some strong edges
    return cams, boundary


def _normalised(rw):
    return rw / rw.max()


@pytest.mark.parametrize(("h", "w", "seed"), [(12, 16, 0), (20, 20, 1), (9, 23, 2)])
def test_sparse_equals_dense_float32(h, w, seed):
    cams, boundary = _inputs(3, h, w, seed)
    dense = random_walk_dense(cams, boundary)
    sparse = random_walk(cams, boundary)
    assert sparse.dtype == torch.float32 and sparse.shape == (3, h, w)
    assert (sparse - dense).abs().max() <= 1e-4
    assert (_normalised(sparse) - _normalised(dense)).abs().max() <= 1e-4
    # Same pseudo-labels after the ×4 upsampling, crop and global-max normalisation.
    keys, size = [3, 7, 15], (4 * h - 3, 4 * w - 1)
    assert np.array_equal(
        pseudo_label_from_rw(sparse, keys, size), pseudo_label_from_rw(dense, keys, size)
    )


def test_sparse_float32_is_close_to_float64_reference():
    # The flux-form update keeps float32 rounding from accumulating over the 256 steps.
    cams, boundary = _inputs(3, 14, 18, 3)
    exact = random_walk_dense(cams, boundary, dtype=torch.float64)
    assert (random_walk(cams, boundary).double() - exact).abs().max() < 5e-6


def _brute_force_walk(cams, boundary, beta, exp_times, radius):
    """propagate_to_edge from its definition, pixel pair by pixel pair, in float64."""
    c, h, w = cams.shape
    b = boundary.double().numpy()
    n = h * w
    a = np.eye(n)
    for y0 in range(h):
        for x0 in range(w):
            for y1 in range(h):
                for x1 in range(w):
                    dy, dx = y1 - y0, x1 - x0
                    if not 0 < dy * dy + dx * dx < radius**2:
                        continue
                    length = math.hypot(dy, dx)
                    line = [
                        b[y, x]
                        for y in range(min(y0, y1), max(y0, y1) + 1)
                        for x in range(min(x0, x1), max(x0, x1) + 1)
                        if abs(dy * (x - x0) - dx * (y - y0)) / length < 1
                    ]
                    a[y0 * w + x0, y1 * w + x1] = 1 - max(line)
    a = a**beta
    t = np.linalg.matrix_power(a / a.sum(axis=0, keepdims=True), 2**exp_times)
    x = (cams.double().numpy() * (1 - b)).reshape(c, n)
    return torch.from_numpy(x @ t).view(c, h, w)


@pytest.mark.parametrize(("radius", "exp_times"), [(5, 8), (3, 4)])
def test_dense_reference_matches_definition(radius, exp_times):
    cams, boundary = _inputs(2, 6, 7, 4)
    expected = _brute_force_walk(cams, boundary, 10, exp_times, radius)
    dense = random_walk_dense(cams, boundary, 10, exp_times, radius, dtype=torch.float64)
    assert (dense - expected).abs().max() < 1e-10
    sparse = random_walk(cams, boundary, 10, exp_times, radius)
    assert (sparse.double() - expected).abs().max() < 5e-6


def test_walk_does_not_cross_a_boundary_wall():
    h, w, wall = 16, 24, 12
    boundary = torch.zeros(h, w)
    boundary[:, wall] = 1.0
    cams = torch.zeros(2, h, w)
    cams[0, 5:10, 2:5] = 1.0  # seed left of the wall
    cams[1, 5:10, 18:21] = 1.0  # seed right of the wall
    rw = random_walk(cams, boundary)
    assert rw[0, :, wall:].abs().max() < 1e-7
    assert rw[1, :, : wall + 1].abs().max() < 1e-7
    # ... while it does spread on its own side, up to the wall.
    assert rw[0, :, wall - 1].min() > 1e-3 and rw[1, :, wall + 1].min() > 1e-3


def test_uniform_boundary_free_walk_diffuses_towards_the_mean():
    # T's columns sum to 1, so each step x ← x·T is a weighted average of neighbours.
    cams, _ = _inputs(2, 10, 12, 5)
    rw = random_walk(cams, torch.zeros(10, 12))
    assert rw.min() >= cams.min() - 1e-6 and rw.max() <= cams.max() + 1e-6
    assert rw.std() < cams.std()


def test_accepts_channel_boundary_and_numpy():
    cams, boundary = _inputs(2, 8, 11, 6)
    a = random_walk(cams, boundary, exp_times=3)
    b = random_walk(cams.numpy().astype(np.float64), boundary[None], exp_times=3)
    assert torch.allclose(a, b, atol=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        random_walk(torch.rand(2, 8, 9), torch.rand(8, 10))
    with pytest.raises(ValueError, match="cams must be"):
        random_walk(torch.rand(8, 9), torch.rand(8, 9))


def test_pseudo_label_hand_checked():
    rw = torch.zeros(1, 4, 4)
    rw[0, :, :2] = 2.0  # normalised to 1.0 on the left half
    rw[0, :, 2:] = 0.2  # normalised 0.1 < 0.25 on the right half -> background
    label = pseudo_label_from_rw(rw, [15], (15, 13))
    assert label.dtype == np.uint8 and label.shape == (15, 13)
    assert (label[:, :6] == 15).all() and (label[:, 10:] == 0).all()
    # The class with the larger score wins; background only under the threshold.
    rw2 = torch.stack([torch.full((3, 3), 0.4), torch.full((3, 3), 0.8)])
    assert (pseudo_label_from_rw(rw2, [2, 9], (12, 12)) == 9).all()
    assert (pseudo_label_from_rw(torch.zeros(2, 3, 3), [2, 9], (10, 10)) == 0).all()


def test_pseudo_label_validates():
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        pseudo_label_from_rw(torch.rand(2, 4, 4), [1], (16, 16))
    with pytest.raises(ValueError, match="larger"):
        pseudo_label_from_rw(torch.rand(1, 4, 4), [1], (17, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    cams, boundary = _inputs(3, 20, 24, 7)
    cpu = random_walk(cams, boundary)
    gpu = random_walk(cams.cuda(), boundary.cuda())
    assert gpu.is_cuda
    assert (gpu.cpu() - cpu).abs().max() < 1e-5
    dense = random_walk_dense(cams.cuda(), boundary.cuda(), dtype=torch.float64)
    assert (gpu.double() - dense).abs().max() < 5e-6
