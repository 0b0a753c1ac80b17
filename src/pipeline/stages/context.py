"""How round-t classifier stages read round t-1's confounders (CONTA), and the M figure."""

from __future__ import annotations

import numpy as np
import torch

from src.datamodules import build_dataset
from src.datamodules.datamodule import ExtraTarget
from src.datamodules.transforms import load_frame
from src.evaluation.figures import overlay_grid
from src.models.context import Confounders, ContextMaskDataset, missing_ids, sample_in_frame
from src.pipeline.artifacts import MissingArtifactError
from src.pipeline.runtime import log_figure
from src.pipeline.stage import StageContext

CONFOUNDER_STAGE = "confounders"
# The frame map places M under the augmented image (see sample_in_frame).
FRAME_TARGETS = {"frame": ExtraTarget("float", load_frame)}


def previous_confounders(ctx: StageContext) -> Confounders | None:
    """The confounders of round t-1 for a round-t stage; None in round 0 (the plain baseline)."""
    if ctx.round == 0:
        return None
    folder = ctx.previous.get(CONFOUNDER_STAGE)
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


@torch.no_grad()
def context_figure(module, dataset, confounders: Confounders, ctx: StageContext) -> None:
    """For a few training images: m (the previous round's mask encoding) and the M the trained
    context module makes of it, both in the image frame; M is scaled by its own max to show
    (its values are ~P(c) = 1/n)."""
    rows = []
    net = module.net.eval()
    for i in range(min(ctx.cfg.conta.figure_images, len(dataset))):
        sample = dataset[i]
        size = tuple(sample["image"].shape[-2:])
        frame = sample["frame"][None]
        mask = sample["context_mask"][None]
        m_img = sample_in_frame(mask[:, None], frame, size)[0, 0].numpy()
        big_m = sample_in_frame(net.context_map(mask), frame, size)[0, 0].numpy()
        rows.append(
            {
                "image": dataset.load_image(i),
                "m": np.clip(m_img, 0, 1),
                "M (/ its max)": big_m / max(float(big_m.max()), 1e-8),
            }
        )
    figure = overlay_grid(
        rows,
        ["background", *confounders.class_names],
        ctx.dir / "context_maps.png",
        title=f"round {ctx.round}: mask encoding m and context map M",
    )
    log_figure(ctx.loggers, "conta/context_maps", figure)
