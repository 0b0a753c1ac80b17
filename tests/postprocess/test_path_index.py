import math

import numpy as np
import pytest
import torch

from src.postprocess.path_index import PathIndex, affinity_from_boundary, get_path_index


@pytest.mark.parametrize(("radius", "expected"), [(10, 152), (5, 34)])
def test_direction_counts_match_irnet(radius, expected):
    assert get_path_index(radius).num_directions == expected


@pytest.mark.parametrize("radius", [3, 5, 10])
def test_directions_are_one_sided_half_of_the_disc(radius):
    pi = get_path_index(radius)
    one_sided = {tuple(d) for d in pi.directions.tolist()}
    assert len(one_sided) == pi.num_directions
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in one_sided)
    mirrored = one_sided | {(-dy, -dx) for dy, dx in one_sided}
    disc = {
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if 0 < dy * dy + dx * dx < radius**2
    }
    assert mirrored == disc


def test_paths_ordered_like_irnet():
    pi = get_path_index(5)
    lengths = [len(p) for p in pi.paths]
    assert lengths == sorted(lengths)
    for path, d in zip(pi.paths, pi.directions, strict=True):
        assert tuple(path[0]) == tuple(d)  # destination first
        assert tuple(path[-1]) == (0, 0)  # source last
    # Inside a length group the search order (dy, then dx) is kept.
    first = [tuple(d) for d, n in zip(pi.directions.tolist(), lengths, strict=True) if n == 2]
    assert first == [(0, 1), (1, 0)]


def test_get_path_index_is_cached():
    assert get_path_index(5) is get_path_index(5)
    pi = get_path_index(5)
    assert pi.pairs(20, 30) is pi.pairs(20, 30)


def test_pairs_layout():
    pi = get_path_index(5)
    h, w = 14, 17
    src, dst = pi.pairs(h, w)
    ch, cw = pi.source_shape(h, w)
    assert src.shape == (ch * cw,) and dst.shape == (34, ch * cw)
    ys, xs = src // w, src % w
    assert ys.min() == 0 and ys.max() == h - 1 - 4 and xs.min() == 4 and xs.max() == w - 1 - 4
    delta = torch.as_tensor(pi.directions[:, 0] * w + pi.directions[:, 1])
    assert torch.equal(dst - src[None], delta[:, None].expand_as(dst))
    assert dst.min() >= 0 and dst.max() < h * w


def test_grid_too_small_raises():
    with pytest.raises(ValueError, match="too small"):
        get_path_index(5).pairs(4, 20)


def _brute_force_affinity(boundary: np.ndarray, radius: int) -> dict:
    """a_ij for every one-sided pair, from the line-distance definition in absolute coords."""
    h, w = boundary.shape
    rf = math.ceil(radius) - 1
    out = {}
    for y0 in range(h - rf):
        for x0 in range(rf, w - rf):
            for dy in range(0, rf + 1):
                for dx in range(-rf, rf + 1):
                    if not (dy > 0 or dx > 0) or dy * dy + dx * dx >= radius**2:
                        continue
                    y1, x1 = y0 + dy, x0 + dx
                    length = math.hypot(dy, dx)
                    on_line = [
                        boundary[y, x]
                        for y in range(min(y0, y1), max(y0, y1) + 1)
                        for x in range(min(x0, x1), max(x0, x1) + 1)
                        if abs(dy * (x - x0) - dx * (y - y0)) / length < 1
                    ]
                    out[(y0 * w + x0, y1 * w + x1)] = 1 - max(on_line)
    return out


@pytest.mark.parametrize("radius", [3, 5])
def test_affinity_equals_brute_force_line_max(radius):
    rng = np.random.default_rng(radius)
    boundary = rng.random((11, 13)).astype(np.float32)
    pi = get_path_index(radius)
    aff = affinity_from_boundary(torch.from_numpy(boundary), pi)
    src, dst = pi.pairs(*boundary.shape)
    got = {
        (s, d): a
        for s, d, a in zip(
            src[None].expand_as(dst).reshape(-1).tolist(),
            dst.reshape(-1).tolist(),
            aff.reshape(-1).tolist(),
            strict=True,
        )
    }
    expected = _brute_force_affinity(boundary, radius)
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) < 1e-6


def test_affinity_matches_irnet_gather_and_batches():
    pi = get_path_index(5)
    boundary = torch.rand(3, 12, 15, generator=torch.Generator().manual_seed(0))
    aff = affinity_from_boundary(boundary, pi)
    assert aff.shape == (3, 34, 8 * 7)
    # IRNet edge_to_affinity: gather along each path group, max over the path, 1 − max.
    flat = boundary.view(3, -1)
    gathered = [1 - flat[:, ind].amax(dim=2) for ind in pi.path_indices(12, 15)]
    assert torch.allclose(aff, torch.cat(gathered, dim=1))
    assert torch.allclose(aff[1], affinity_from_boundary(boundary[1], pi))


def test_affinity_gradient_flows():
    pi = PathIndex(3)
    boundary = torch.rand(2, 5, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda b: affinity_from_boundary(b, pi)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (boundary,), fast_mode=True)
    logits = torch.randn(1, 10, 12, requires_grad=True)
    aff = affinity_from_boundary(torch.sigmoid(logits), get_path_index(5))
    (-torch.log(aff + 1e-5)).mean().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_to_displacement_matches_pairs():
    pi = get_path_index(5)
    field = torch.randn(2, 2, 10, 12)
    disp = pi.to_displacement(field)
    src, dst = pi.pairs(10, 12)
    flat = field.flatten(2)
    assert torch.allclose(disp, flat[..., src][:, :, None] - flat[..., dst])
    assert pi.displacement_targets().shape == (1, 2, 34, 1)
