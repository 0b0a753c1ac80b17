"""How round-t classifier stages read round t-1's confounders (CONTA): the switches' validation,
the context diagnostics (is M alive, does it reach the logits?) and the M figure."""

from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Subset

from src.datamodules import build_dataset, eval_transform
from src.datamodules.datamodule import ExtraTarget, collate_same_size, inference_loader
from src.datamodules.transforms import load_frame
from src.evaluation.figures import overlay_grid
from src.models.context import (
    ATTENTION_MODES,
    CONTEXT_VARIANTS,
    Confounders,
    ContextMaskDataset,
    context_statistics,
    missing_ids,
    sample_in_frame,
)
from src.pipeline.stage import StageContext
from src.utils.errors import MissingArtifactError
from src.utils.loggers import log_figure

log = logging.getLogger(__name__)
# The frame map places M under the augmented image (see sample_in_frame).
FRAME_TARGETS = {"frame": ExtraTarget("float", load_frame)}


# Accepted values of the CONTA switches (validated before any stage runs).
CONTA_CHOICES = {
    "context": CONTEXT_VARIANTS,
    "c_source": ("pred", "gt", "mean"),
    "m_source": ("own", "shuffled"),
    "ablate": ("none", "zero_m"),
    "attention": ATTENTION_MODES,
}
# Below these M does not reach the classifier in any useful way (see context_diagnostics).
INERT = {"alpha_entropy": 0.98, "m_spread": 0.01, "m_logit_share": 0.01}


def validate_conta(cfg: DictConfig) -> None:
    """A clear error for an unknown CONTA switch or gt sources on a split without masks."""
    conta = cfg.get("conta")
    if conta is None:
        return
    for key, choices in CONTA_CHOICES.items():
        value = conta.get(key)
        if value not in choices:
            raise ValueError(
                f"conta.{key}={value!r} is unknown; choose one of {list(choices)} "
                f"(e.g. conta.{key}={choices[0]})"
            )
    if conta.c_source == "gt":
        splits = cfg.data.get("splits") or {}
        for split in dict.fromkeys([cfg.data.train_split, cfg.data.val_split]):
            if not (splits.get(split) or {}).get("masks"):
                raise ValueError(
                    f"conta.c_source=gt builds C and m from ground-truth masks, but split "
                    f"{split!r} has none (data.splits.{split}.masks is unset). Fix: use "
                    "conta.c_source=pred, or a split with masks."
                )


def previous_confounders(ctx: StageContext) -> Confounders | None:
    """The confounders of round t-1 for a round-t stage; None in round 0 (the plain baseline)."""
    if ctx.round == 0:
        return None
    folder = ctx.previous.get("confounders")  # the role
    if folder is None:
        raise MissingArtifactError(
            f"round {ctx.round}: {ctx.name} needs round {ctx.round - 1}'s confounders"
        )
    cfg = ctx.cfg
    confounders = Confounders.load(
        folder,
        expected_dataset=cfg.data.name,
        expected_num_classes=cfg.data.num_classes - 1,
        expected_size=tuple(cfg.conta.size),
        expected_context=cfg.conta.context,
    )
    ids = build_dataset(cfg.data, cfg.data.train_split).ids
    missing = missing_ids(confounders, ids)
    if missing:
        raise MissingArtifactError(
            f"{folder} has no context mask for {len(missing)} training images (e.g. "
            f"{missing[:3]}): it was built on another split; re-run round {ctx.round - 1} "
            "with force=[confounders]"
        )
    return confounders


def context_wrapper(confounders: Confounders):
    """A data set wrapper adding each image's m (`context_mask`) to its samples."""

    def wrap(dataset):
        return ContextMaskDataset(dataset, confounders)

    return wrap


def classifier_inference_set(cfg: DictConfig, confounders: Confounders | None):
    """The training images at the evaluation transform; with confounders, also each image's
    frame map and m (what a CONTA classifier reads)."""
    extras = {} if confounders is None else FRAME_TARGETS
    dataset = build_dataset(
        cfg.data,
        cfg.data.train_split,
        eval_transform(cfg.data.mean, cfg.data.std, {k: e.kind for k, e in extras.items()}),
        extras={k: e.load for k, e in extras.items()},
    )
    return dataset if confounders is None else context_wrapper(confounders)(dataset)


@torch.no_grad()
def m_logit_share(net, loader) -> float:
    """Mean over images of |what the M channel adds to the top class logit| / |that logit|:
    the logit with M minus the logit with the M channel zeroed (for layer4_out without a post
    conv exactly w_M * mean(M channel); for the other injection points the same ablation)."""
    device = next(net.parameters()).device
    shares = []
    for batch in loader:
        inputs = [batch[k].to(device) for k in ("image", "context_mask", "frame")]
        full = net(*inputs)
        dropped = net(*inputs, drop_context=True)
        top = full.argmax(dim=1, keepdim=True)
        with_m, without_m = full.gather(1, top), dropped.gather(1, top)
        shares.append(((with_m - without_m).abs() / with_m.abs().clamp_min(1e-6)).flatten())
    return float(torch.cat(shares).double().mean())


def context_diagnostics(module, confounders: Confounders, ctx: StageContext) -> dict:
    """Is the round's M alive and does it reach the output? Over the training images (at most
    ``conta.diagnostic_images``, evenly spaced): alpha_max, alpha_entropy, m_spread (see
    ``context_statistics``) and m_logit_share. Logs a warning when M is inert."""
    cfg = ctx.cfg
    net = module.net.eval()
    dataset = classifier_inference_set(cfg, confounders)
    limit = int(cfg.conta.diagnostic_images)
    keep = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int))
    ids = [dataset.ids[i] for i in keep]
    masks = torch.from_numpy(np.stack([confounders.mask_for(i) for i in ids]))
    stats = context_statistics(net.context, masks.to(next(net.parameters()).device))
    loader = inference_loader(
        Subset(dataset, keep.tolist()),
        cfg.cam.inference.batch_size,
        cfg.num_workers,
        collate_same_size,
    )
    stats["m_logit_share"] = m_logit_share(net, loader)
    stats["images"] = len(keep)
    if hasattr(net.context, "temperature"):
        stats["temperature"] = float(net.context.temperature.detach())
        stats["gain"] = float(net.context.gain.detach())
    inert = [
        k
        for k, bound in INERT.items()
        if (stats[k] > bound if k == "alpha_entropy" else stats[k] < bound)
    ]
    stats["inert"] = bool(inert)
    summary = ", ".join(f"{k}={stats[k]:.4g}" for k in ("alpha_max", *INERT))
    if inert:
        log.warning(
            "round %d: the context map M is inert (%s; %s past %s): the classifier is "
            "effectively round 0's. Try conta.context=calibrated or another conta.inject_at.",
            ctx.round,
            summary,
            inert,
            {k: INERT[k] for k in inert},
        )
    else:
        log.info("round %d: context map M: %s", ctx.round, summary)
    return stats


@torch.no_grad()
def context_figure(module, dataset, confounders: Confounders, ctx: StageContext) -> None:
    """For a few training images: m (the previous round's mask encoding) and the M the trained
    context module makes of it, in the image frame. Every M panel shares one colour scale (its
    range is in the title), so a map that is the same for every image looks the same."""
    net = module.net.eval()
    shown = []
    for i in range(min(ctx.cfg.conta.figure_images, len(dataset))):
        sample = dataset[i]
        size = tuple(sample["image"].shape[-2:])
        frame = sample["frame"][None]
        mask = sample["context_mask"][None]
        m_img = sample_in_frame(mask[:, None], frame, size)[0, 0].numpy()
        big_m = sample_in_frame(net.context_map(mask), frame, size)[0, 0].numpy()
        shown.append((dataset.load_image(i), m_img, big_m))
    lo = min(float(b.min()) for _, _, b in shown)
    hi = max(float(b.max()) for _, _, b in shown)
    span = max(hi - lo, 1e-12)
    rows = [
        {"image": image, "m": np.clip(m_img, 0, 1), "M (shared scale)": (big_m - lo) / span}
        for image, m_img, big_m in shown
    ]
    figure = overlay_grid(
        rows,
        ["background", *confounders.class_names],
        ctx.dir / "context_maps.png",
        title=(
            f"round {ctx.round}: m and M (conta.context={confounders.context})\n"
            f"M on one scale for all rows: {lo:.3g} to {hi:.3g}"
        ),
    )
    log_figure(ctx.loggers, "conta/context_maps", figure)
