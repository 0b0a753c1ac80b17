import torch

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
