"""method=cam: the CAM-only baseline, the lower bound every WSSS paper reports. The classifier's
CAMs at the CAM threshold (cam.eval.bg_threshold, the one eval_cams scores) are the pseudo-masks,
with no expansion; eval_pseudo and the segmenter take them as any method's.

The smallest method module: one stage and no private role (docs/adding-a-method.md).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from src.datamodules import build_dataset
from src.datamodules.palette import save_label_png
from src.datamodules.validation import image_header_size
from src.evaluation.cam import cam_to_label
from src.pipeline.stage import Stage, StageContext, StageResult
from src.pipeline.stages.cam import checked_high_res, load_cam
from src.pipeline.stages.keys import TRAIN_IMAGES
from src.pipeline.stages.pseudo_masks import MASK_DIR, write_labels_from_cams


def _cam_mask_job(job: tuple, *, bg_threshold: float, out_dir: Path) -> None:
    image_id, image_path, cam_dir = job
    cam = load_cam(cam_dir, image_id)
    high_res = checked_high_res(cam, image_id, cam_dir, image_header_size(image_path))
    save_label_png(out_dir / f"{image_id}.png", cam_to_label(high_res, cam["keys"], bg_threshold))


def make_cam_masks(ctx: StageContext) -> StageResult:
    """A pseudo-mask per training image: the background plane at the CAM threshold in front of
    the image's class CAMs, argmax (src/evaluation/cam.py cam_to_label, eval_cams' rule).
    Cheap: each rank labels its share in its own process."""
    cfg = ctx.cfg
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    job = partial(_cam_mask_job, bg_threshold=cfg.cam.eval.bg_threshold, out_dir=ctx.dir / MASK_DIR)
    return write_labels_from_cams(ctx, dataset, MASK_DIR, job, workers_key=None)


# -- what the method declares (src/methods/__init__.py) ---------------------------------------
ROLES: dict[str, str] = {}  # it reads and writes shared roles only
STAGES = [
    Stage(
        "make_cam_masks",
        make_cam_masks,
        (*TRAIN_IMAGES, "cam.eval.bg_threshold"),
        produces="pseudo_masks",
        inputs=("cams",),
    ),
]
