"""Share of SEC's / DSRG's training step spent in the training-time dense CRF (prints, no asserts).

SEC's constrain loss and DSRG's region growing need a dense CRF of every image of every batch
(pydensecrf, CPU, one image at a time). This times, in one process and on the same batch:

* ``step``: a whole training step (forward, the three losses with the CRF, backward, SGD step);
* ``crf``: the CRF targets alone (``crf_targets`` on the batch's probabilities);
* ``grow``: DSRG's region growing alone (scipy, CPU);

and prints the CRF's share of the step. Shapes: ``paper`` = SEC's 321 x 321 input (41 x 41 grid),
VGG-16 LargeFOV, 21 classes; ``synth`` = the synthetic recipe (96 px, 12 x 12 grid, tiny ResNet).
Random weights and images (the CRF runs a fixed number of iterations: its cost depends on the
grid and the class count, not on the values). On a GPU the net's part shrinks and the CRF stays
on the CPU, so its share grows: run it there too (``--device cuda``).

    python bench/seeded_step.py [--shape paper|synth] [--batch 4] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.models.backbone import ResNetBackbone  # noqa: E402
from src.models.dsrg import grow_batch  # noqa: E402
from src.models.seeded import VGG16Backbone, crf_targets, seeded_net  # noqa: E402
from src.models.seeded_module import DSRGModule, SECModule  # noqa: E402

SHAPES = {
    # input size, classes, backbone factory, head kwargs
    "paper": (321, 21, lambda: VGG16Backbone(weights=None), {"hidden": 1024, "dilation": 12}),
    "synth": (
        96,
        7,
        lambda: ResNetBackbone(
            arch="resnet_tiny", strides=[2, 2, 1, 1], norm="train", frozen_stages=0
        ),
        {"hidden": 128, "dilation": 2},
    ),
}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, classes, backbone, head = SHAPES[args.shape]
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, device=device)
    label = (torch.rand(args.batch, classes - 1) < 0.2).float().to(device)
    label[:, 0] = 1.0
    print(f"shape {args.shape}: input {size}, {classes} classes, batch {args.batch}, {device}")
    for name, module_cls in (("SEC", SECModule), ("DSRG", DSRGModule)):
        net = seeded_net(backbone(), classes, head="largefov", **head)
        measure(name, module_cls(net, classes).to(device), images, label, args.repeats, device)


def measure(name: str, module, images, label, repeats: int, device: torch.device) -> None:
    """Time a whole step, the CRF alone and (DSRG) the growing alone on one batch; print."""
    with torch.no_grad():
        probs = module.probs(images)
    cues = torch.zeros_like(probs, dtype=torch.bool)
    cues[:, 0, :2] = True  # a background strip and one foreground cell per labelled class
    grid = probs.shape[-1]
    cues[:, 1:, grid // 2, grid // 2] = label.bool()
    batch = {"image": images, "label": label, "cues": cues}
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = module.losses(batch, module.probs(images))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def crf():
        return crf_targets(module.crf_images(images), probs, module.crf_params)

    target = crf()
    labels = module.labels_with_background(batch)
    t_step = timed(step, repeats, device)
    t_crf = timed(crf, repeats, device)
    line = f"{name}: step {t_step * 1e3:.1f} ms, CRF {t_crf * 1e3:.1f} ms"
    share = f"CRF share of the step {t_crf / t_step:.3f}"
    if name == "DSRG":
        t_grow = timed(lambda: grow_batch(target, cues, labels), repeats, device)
        line += f", grow {t_grow * 1e3:.1f} ms"
        share += f", CRF + growing {(t_crf + t_grow) / t_step:.3f}"
    print(f"{line}; {share}")


if __name__ == "__main__":
    main()
