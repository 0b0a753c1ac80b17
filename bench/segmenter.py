"""DeepLab-v2 segmenter throughput: MSC vs single-scale training steps and inference (prints only).

One model, one fixed batch, one process. Training: images/s of a full deeplab-pytorch MSC step
(logits at every scale of ``segmenter.module.scales``, or deeplab-pytorch's 1/0.75/0.5 for a
single-scale config such as segmenter=synth, + their max, summed CE, backward, SGD step
with the module's lr groups and poly schedule) and of a single-scale step (scale 1.0, CE on one
output) of the same model on the same crop-size batch; the two are interleaved iteration by
iteration so load from other processes hits both alike, and their cost ratio is printed next to
deeplab-pytorch's expected ~1.8x (input pixels 1 + 0.75² + 0.5² = 1.81). Inference: eval-mode MSC
max vs a single-scale forward on full images (the synthetic set's, or random ones of
``--infer-size``), a batch of ``segmenter.inference.batch_size``. Data loading is not timed.

    python bench/segmenter.py [--steps 20] [--warmup 3] [--quick] [key=value overrides ...]
    # the paper model (segmenter=deeplab: frozen BN, rates 6..24, 21 classes, 500x375 inference):
    python bench/segmenter.py --arch resnet101 --crop 321 --batch 5 --device cuda [--bf16]

Backbones start from random weights (no download); the speed does not depend on them. On a CPU
shared with other jobs use --threads 1: two OpenMP threads competing for a busy core ran the
synthetic step ~10x slower than one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.datamodules import build_dataset, eval_transform, prepare_data, train_transform  # noqa: E402
from src.models.deeplab import DeepLabV2, SegmenterModule, msc_logits, msc_loss  # noqa: E402

DLP_MSC_COST = 1.8  # deeplab-pytorch's expected MSC training cost over a single scale


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' (width x height, as VOC sizes are quoted) -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from err
    return h, w


def compose_cfg(segmenter: str, overrides: list[str]) -> DictConfig:
    """conf/train.yaml with the segmenter group; `+` when train.yaml does not list the group."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        try:
            cfg = compose("train", overrides=[f"segmenter={segmenter}", *overrides])
        except ConfigCompositionException:
            cfg = compose("train", overrides=[f"+segmenter={segmenter}", *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def input_pixel_ratio(h: int, w: int, scales: list[float]) -> float:
    """Input pixels of all MSC scales over scale 1.0's, at the sizes F.interpolate produces."""
    return sum(int(h * s) * int(w * s) for s in scales) / (h * w)


def time_interleaved(
    fns: dict[str, Callable[[], None]], steps: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating fns every iteration (order reversed every other
    iteration) so drifting machine load is shared between them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant first")
    p.add_argument("--quick", action="store_true", help="3 timed iterations after 1 warm-up")
    p.add_argument(
        "--segmenter",
        choices=["synth", "deeplab"],
        default=None,
        help="config group (default: deeplab when --arch is a torchvision ResNet)",
    )
    p.add_argument("--arch", default=None, help="backbone arch, e.g. resnet101 (the paper's)")
    p.add_argument("--crop", type=int, default=None, help="training crop (segmenter.crop_size)")
    p.add_argument("--batch", type=int, default=None, help="training batch (segmenter.batch_size)")
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="output classes (default: data.num_classes; 21 with segmenter=deeplab)",
    )
    p.add_argument(
        "--infer-size",
        type=parse_size,
        default=None,
        metavar="WxH",
        help="random inference images of this size instead of the synthetic ones "
        "(default 500x375 with segmenter=deeplab)",
    )
    p.add_argument(
        "--infer-batch",
        type=int,
        default=None,
        help="inference batch (segmenter.inference.batch_size)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (meant for cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args, overrides = p.parse_known_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = args.segmenter or ("deeplab" if args.arch not in (None, "resnet_tiny") else "synth")
    cfg = compose_cfg(segmenter, overrides)
    seg = cfg.segmenter
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as deeplab-pytorch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def autocast():
        if not args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    # Model: the config's backbone (random weights), ASPP, the module's lr groups.
    backbone_cfg = OmegaConf.to_container(seg.backbone, resolve=True)
    backbone_cfg.update(weights=None, weights_path=None)
    if args.arch:
        backbone_cfg["arch"] = args.arch
    classes = args.classes or (21 if segmenter == "deeplab" else int(cfg.data.num_classes))
    accepted = inspect.signature(SegmenterModule).parameters
    scales = [float(s) for s in seg.module.scales]
    if len(scales) == 1:  # a single-scale config (segmenter=synth): MSC at deeplab-pytorch's scales
        scales = [float(s) for s in accepted["scales"].default]
    net = DeepLabV2(instantiate(backbone_cfg), classes, list(seg.rates)).to(device)
    module_kwargs = {k: v for k, v in seg.module.items() if k in accepted}
    module = SegmenterModule(
        net,
        classes,
        optimizer=instantiate(seg.optimizer),
        scheduler=instantiate(seg.scheduler),
        total_steps=int(seg.max_steps),
        **module_kwargs,
    )

    def make_optimizer():
        opt = module.configure_optimizers()
        return opt["optimizer"], opt["lr_scheduler"]["scheduler"]

    # One fixed crop-size training batch from the synthetic set (the stage's augmentation).
    prepare_data(cfg.data)
    crop = args.crop or int(seg.crop_size)
    batch_size = args.batch or int(seg.batch_size)
    train_set = build_dataset(
        cfg.data,
        cfg.data.train_split,
        train_transform(
            crop,
            mean=cfg.data.mean,
            std=cfg.data.std,
            scale_choices=list(seg.scale_choices),
            seed=0,
        ),
    )
    batch = next(iter(DataLoader(train_set, batch_size=batch_size, shuffle=False)))
    images, target = batch["image"].to(device), batch["mask"].to(device)

    def train_step(optimizer, scheduler, msc: bool) -> Callable[[], None]:
        def step() -> None:
            with autocast():
                logits = msc_logits(net, images, scales, training=True) if msc else [net(images)]
                loss = msc_loss(logits, target, module.hparams.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

        return step

    train_fns = {
        "MSC": train_step(*make_optimizer(), msc=True),
        "single": train_step(*make_optimizer(), msc=False),
    }
    module.train()
    for fn in train_fns.values():
        for _ in range(args.warmup):
            fn()
    peak: dict[str, float] = {}
    if cuda:  # one more step each, after warm-up: cudnn.benchmark's trial workspaces excluded
        for name, fn in train_fns.items():
            sync()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    train_times = time_interleaved(train_fns, args.steps, sync)

    # Inference: full images, eval-mode MSC max vs one forward at scale 1.0.
    infer_batch = args.infer_batch or int(seg.inference.batch_size)
    infer_size = args.infer_size or ((375, 500) if segmenter == "deeplab" else None)
    if infer_size is None:
        eval_set = build_dataset(
            cfg.data, cfg.data.train_split, eval_transform(cfg.data.mean, cfg.data.std)
        )
        full = next(iter(DataLoader(eval_set, batch_size=infer_batch)))["image"]
        infer_what = "synthetic images"
    else:
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(infer_batch, 3, *infer_size, generator=gen)
        infer_what = "random images"
    full = full.to(device)
    module.eval()

    def infer(scale: float | None) -> Callable[[], None]:
        """MSC max (scale None) or one forward at `scale` (resize included)."""

        def run() -> None:
            with torch.inference_mode(), autocast():
                if scale is None:
                    module(full)
                elif scale == 1.0:
                    net(full)
                else:
                    net(
                        F.interpolate(
                            full, scale_factor=scale, mode="bilinear", align_corners=False
                        )
                    )

        return run

    # Each MSC scale alone too: shows whether cost follows pixels (it does not when small
    # inputs are bound by per-op overhead rather than arithmetic).
    infer_fns = {"MSC": infer(None), "single": infer(1.0)}
    infer_fns.update({f"x{s:g}": infer(s) for s in scales if s != 1.0})
    for fn in infer_fns.values():
        for _ in range(args.warmup):
            fn()
    infer_times = time_interleaved(infer_fns, args.steps, sync)

    # Report.
    threads = f"{torch.get_num_threads()} threads" if not cuda else torch.cuda.get_device_name()
    print(
        f"segmenter={segmenter}: {backbone_cfg['arch']} (norm {backbone_cfg['norm']}, OS"
        f"{net.output_stride}), ASPP rates {list(seg.rates)}, {classes} classes, MSC scales {scales}"
    )
    print(
        f"device {device} ({threads}), {'bf16 autocast' if args.bf16 else 'float32'}; mean of "
        f"{args.steps} iterations after {args.warmup} warm-up, variants interleaved"
    )

    def table(
        title: str, times: dict[str, list[float]], n_images: int, h: int, w: int, mem=None
    ) -> None:
        print(f"\n{title}")
        head = f"  {'':<8} {'ms/iter':>9} {'± sd':>7} {'median':>8} {'images/s':>9}"
        print(head + (f" {'peak GiB':>9}" if mem else ""))
        for name, ts in times.items():
            mean = statistics.fmean(ts)
            sd = statistics.stdev(ts) if len(ts) > 1 else 0.0
            med = statistics.median(ts)
            gib = f" {mem[name]:>9.2f}" if mem else ""
            print(
                f"  {name:<8} {mean * 1e3:>9.1f} {sd * 1e3:>7.1f} {med * 1e3:>8.1f} "
                f"{n_images / mean:>9.1f}{gib}"
            )
        ratio = statistics.fmean(times["MSC"]) / statistics.fmean(times["single"])
        ratio_med = statistics.median(times["MSC"]) / statistics.median(times["single"])
        pixels = input_pixel_ratio(h, w, scales)
        print(
            f"  MSC / single cost: {ratio:.2f}x (medians {ratio_med:.2f}x); deeplab-pytorch "
            f"expects ~{DLP_MSC_COST}x, input pixels {pixels:.2f}x"
        )

    table(
        f"training step, batch {batch_size} of {crop}x{crop} crops "
        "(fwd + summed CE + bwd + SGD/poly):",
        train_times,
        batch_size,
        crop,
        crop,
        peak,
    )
    h, w = full.shape[-2:]
    table(
        f"inference, batch {infer_batch} of {w}x{h} {infer_what} (eval MSC max vs scale 1.0):",
        infer_times,
        infer_batch,
        h,
        w,
    )


if __name__ == "__main__":
    main()
