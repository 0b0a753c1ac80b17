import pytest
import torch

from src.postprocess.psa_labels import random_walk_affinity, random_walk_affinity_batch
from src.postprocess.random_walk import random_walk, random_walk_batch


def test_batched_walk_equals_per_image_walks():
    g = torch.Generator().manual_seed(0)
    boundaries = torch.rand(3, 14, 17, generator=g) ** 3
    cams = [torch.rand(k, 14, 17, generator=g) for k in (2, 1, 3)]
    batched = random_walk_batch(cams, boundaries, beta=10, exp_times=5, radius=5)
    for cam, boundary, out in zip(cams, boundaries, batched, strict=True):
        alone = random_walk(cam, boundary, beta=10, exp_times=5, radius=5)
        assert out.shape == cam.shape
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)


# VOC images differ in size: (h, w) grids taller, wider and narrower than their neighbours.
SIZES = [(14, 17), (9, 23), (16, 8), (11, 17)]


def test_a_batch_of_images_of_different_sizes_walks_each_as_alone():
    g = torch.Generator().manual_seed(1)
    boundaries = [torch.rand(h, w, generator=g) ** 3 for h, w in SIZES]
    cams = [torch.rand(k, h, w, generator=g) for k, (h, w) in zip((2, 1, 3, 2), SIZES, strict=True)]
    batched = random_walk_batch(cams, boundaries, beta=10, exp_times=6, radius=5)
    for cam, boundary, out in zip(cams, boundaries, batched, strict=True):
        alone = random_walk(cam, boundary, beta=10, exp_times=6, radius=5)
        assert out.shape == cam.shape
        # The extra pairs of the tall grid all weigh exactly 0: the same sums, bit for bit.
        assert torch.equal(out, alone)


def test_psa_walk_of_images_of_different_sizes_walks_each_as_alone():
    g = torch.Generator().manual_seed(2)
    # Affinities nonzero everywhere, out-of-grid pairs included: the batch must zero those itself.
    affs = [torch.rand(34, h, w, generator=g) for h, w in SIZES]
    cams = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    batched = random_walk_affinity_batch(cams, affs, logt=4)
    for cam, aff, out in zip(cams, affs, batched, strict=True):
        torch.testing.assert_close(out, random_walk_affinity(cam, aff, logt=4), atol=1e-6, rtol=0)


def test_a_walk_input_off_its_grid_is_refused():
    with pytest.raises(ValueError, match=r"walk input \(2, 9, 9\) is not .* grid \(9, 8\)"):
        random_walk_batch([torch.rand(2, 9, 9)], [torch.rand(9, 8)])
    with pytest.raises(ValueError, match="as many walk inputs as maps"):
        random_walk_batch([torch.rand(2, 9, 9)], [])
