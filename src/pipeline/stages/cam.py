"""Classifier stages: train_cam -> make_cams -> eval_cams (IRNet steps 1-3)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from src.callbacks.prediction_writer import NpzPredictionWriter
from src.datamodules import WSSSDataModule, build_dataset
from src.datamodules.datamodule import collate_same_size, inference_loader
from src.evaluation.cam import ThresholdSweep, cam_to_label
from src.evaluation.figures import overlay_grid
from src.models.cam import CAMClassifier, CAMNet
from src.models.context import context_generator
from src.models.optim import momentum_of
from src.pipeline.artifacts import missing_items, resume_counts
from src.pipeline.batching import batch_metrics, split_over_ranks
from src.pipeline.sharding import metric_group, my_share
from src.pipeline.stage import StageContext, StageResult
from src.pipeline.stages.context import (
    FRAME_TARGETS,
    classifier_inference_set,
    context_diagnostics,
    context_figure,
    context_wrapper,
    previous_confounders,
)
from src.pipeline.trainers import build_trainer
from src.utils.errors import MissingArtifactError
from src.utils.loggers import log_figure
from src.utils.ranks import barrier, is_global_zero, run_on_rank_zero
from src.utils.untrusted import Source, UntrustedFileError, read_npz
from src.utils.weights import load_weights, save_weights

if TYPE_CHECKING:
    from src.models.context import Confounders

log = logging.getLogger(__name__)
WEIGHTS_FILE = "cam_net.pt"
CAM_DIR = "cams"
CAM_ARRAYS = {"keys": "iu", "cam": "fu", "high_res": "fu"}  # what make_cams writes
CAM_MAPS = ("cam", "high_res")  # values in [0, 1] (max-normalised), stored per cam.inference.store
# uint8 CAM files: bins of 1/200 with edges on the multiples of 0.005, so that every threshold
# on that grid (the eval sweep, IRNet's 0.05 / 0.30) splits the stored maps
# exactly as it splits the computed ones; a value is stored at its bin's centre (error <= 0.0025).
CAM_LEVELS = 200
MAX_CLASS_KEY = 254  # keys become uint8 label ids; 255 is the ignore index
_RANGE_SLACK = 1e-3  # max-normalised maps: 1 up to float rounding
CAM_STORES = ("uint8", "float16")


def cam_encoder(store: str) -> Callable[[dict], dict]:
    """How make_cams stores the maps: `uint8` (bin q = ceil(200 x), zlib-compressed) or `float16`
    as computed. bench/cam_store.py measures the bytes and scores of both."""
    if store not in CAM_STORES:
        raise ValueError(f"cam.inference.store={store!r}: use one of {list(CAM_STORES)}")

    def encode(arrays: dict) -> dict:
        out = dict(arrays)
        for key in CAM_MAPS:
            x = np.asarray(arrays[key], dtype=np.float32)
            if store == "uint8":
                # float64: x * 200 must not round onto a bin edge that x lies above
                out[key] = np.ceil(np.clip(x, 0.0, 1.0).astype(np.float64) * CAM_LEVELS).astype(
                    np.uint8
                )
            else:
                out[key] = x.astype(np.float16)
        return out

    return encode


def decode_cam(arrays: dict[str, np.ndarray], src: Source | None = None) -> dict:
    """The maps as float32 in [0, 1], whichever store wrote them (uint8: bin centres, 0 kept)."""
    out = dict(arrays)
    for key in CAM_MAPS:
        a = arrays[key]
        if a.dtype.kind == "u":
            if a.dtype != np.uint8 or (a.size and a.max() > CAM_LEVELS):
                message = (
                    f"array {key!r} is not a uint8 CAM (dtype {a.dtype}, bins 0..{CAM_LEVELS})"
                )
                if src is None:
                    raise ValueError(message)
                src.fail(message)
            out[key] = np.maximum(a.astype(np.float32) - 0.5, 0.0) / np.float32(CAM_LEVELS)
        else:
            out[key] = a.astype(np.float32)
    return out


class WeightsFileError(MissingArtifactError, UntrustedFileError):
    """A stage's weight file that is damaged or not what the stage writes (a user error: the
    fix is to redo that stage)."""


def read_weights(path: Path, stage: str) -> dict[str, torch.Tensor]:
    """The weights `stage` saved (src/utils/weights.py: digest checked); else WeightsFileError
    naming the file and the stage to redo."""
    fix = (
        f"delete it and re-run the {stage} stage: force=[{stage}] (or delete its folder "
        f"{path.parent})"
    )
    return load_weights(Source(path, fix, WeightsFileError))


def build_cam_classifier(
    cfg: DictConfig, confounders: Confounders | None = None, seed: int = 0
) -> CAMClassifier:
    """The method's classifier from `cam.net` / `cam.module` (`_partial_` configs: IRNet's
    CAMNet / CAMClassifier, SEAM's SEAMNet / SEAMClassifier); with the previous round's
    confounders, CONTA's context module M goes into the net, whatever the method.

    The backbone and class conv draw from the global RNG as in round 0; the CONTA parameters
    from their own generator (``seed``), so rounds share their random numbers (see CAMNet)."""
    backbone = instantiate(cfg.backbone)
    context, generator = None, context_generator(seed)
    if confounders is not None:
        context = confounders.context_module(
            cfg.conta.proj_dim,
            temperature=cfg.conta.temperature,
            generator=generator,
            attention=cfg.conta.attention,
        )
    net = instantiate(cfg.cam.net, _convert_="all")(
        backbone,
        num_classes=cfg.data.num_classes - 1,
        context=context,
        inject_at=cfg.conta.inject_at,
        post_concat_conv=cfg.conta.post_concat_conv,
        generator=generator,
        ablate_context=cfg.conta.ablate == "zero_m",
    )
    module = instantiate(cfg.cam.module, _convert_="all")(
        net,
        optimizer=instantiate(cfg.cam.optimizer),
        scheduler=instantiate(cfg.cam.scheduler),
        scales=list(cfg.cam.inference.scales),
        flip=cfg.cam.inference.flip,
        normalise=cfg.cam.inference.get("normalise", "max"),
    )
    if not isinstance(module, CAMClassifier) or not isinstance(net, CAMNet):
        raise TypeError(
            f"cam.net / cam.module built {type(net).__name__} / {type(module).__name__}: the "
            "CAM stages need a CAMNet and a CAMClassifier (or subclasses, e.g. SEAM's)"
        )
    return module


def train_cam(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    confounders = previous_confounders(ctx)
    conta = {}
    if confounders is not None:
        # M follows every crop/scale/flip through the frame map; m is per image (not augmented).
        conta = {
            "extra_train_targets": FRAME_TARGETS,
            "extra_eval_targets": FRAME_TARGETS,
            "wrap": context_wrapper(confounders),
        }
    trainer = build_trainer(cfg, ctx.dir, ctx.loggers, training=True, max_epochs=cfg.cam.max_epochs)
    share = split_over_ranks(trainer, cfg.cam.batch_size, "cam.batch_size")
    datamodule = WSSSDataModule(
        cfg.data,
        train_split=cfg.data.train_split,
        val_split=cfg.data.val_split,
        batch_size=share.per_rank,
        num_workers=cfg.num_workers,
        crop_size=cfg.cam.crop_size,
        scale_range=cfg.cam.scale_range,
        resize_long=cfg.cam.resize_long,
        color_jitter=cfg.cam.get("color_jitter"),
        **conta,
    )
    module = build_cam_classifier(cfg, confounders, seed=ctx.seed)
    if confounders is not None and cfg.conta.init == "finetune":
        _load_previous_weights(module, ctx.previous["classifier"] / WEIGHTS_FILE)
    elif cfg.conta.init not in ("reinit", "finetune"):
        raise ValueError(f"conta.init={cfg.conta.init!r}: use reinit|finetune")
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=ctx.checkpoint_to_resume(), weights_only=True
    )
    if trainer.is_global_zero:
        save_weights(ctx.dir / WEIGHTS_FILE, module.net.state_dict())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["momentum"] = momentum_of(trainer.optimizers)
    metrics["resume"] = ctx.training_resume(trainer)
    metrics.update(batch_metrics(trainer, share))
    if confounders is None or not trainer.is_global_zero:
        return StageResult(metrics=metrics, artifacts=[WEIGHTS_FILE])
    result = StageResult(metrics=metrics, artifacts=[WEIGHTS_FILE])
    return _with_diagnostics(result, module, confounders, ctx)


def _with_diagnostics(
    result: StageResult, module: CAMClassifier, confounders: Confounders, ctx: StageContext
) -> StageResult:
    """`result` with the diagnostics of M (a CONTA round's) as its record and metrics."""
    diagnostics = context_diagnostics(module, confounders, ctx)
    result.metrics.update({f"context/{k}": v for k, v in diagnostics.items()})
    result.results, result.prefix, result.nested = diagnostics, "context", True
    return result


def rescore_classifier(ctx: StageContext) -> StageResult:
    """train_cam's record recomputed from its weights (a copy's, with `reuse_from`): in a CONTA
    round, the diagnostics of M, so a donor's are never taken on faith; none in round 0."""
    result = StageResult(metrics={}, artifacts=[WEIGHTS_FILE])
    confounders = previous_confounders(ctx)
    if confounders is None or not is_global_zero():  # train_cam computes them on rank 0 too
        return result
    module = build_cam_classifier(ctx.cfg, confounders, seed=ctx.seed)
    module.net.load_state_dict(read_weights(ctx.dir / WEIGHTS_FILE, "train_cam"))
    return _with_diagnostics(result, module, confounders, ctx)


def _load_previous_weights(module: CAMClassifier, weights: Path) -> None:
    """conta.init=finetune: start from round t-1's classifier; tensors whose shape changed with
    the context injection (the class conv, a widened stage input) keep their fresh init."""
    if not weights.is_file():
        raise MissingArtifactError(f"{weights} missing: conta.init=finetune needs round t-1's")
    state = read_weights(weights, "train_cam")
    own = module.net.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.net.load_state_dict(kept, strict=False)
    log.info("finetune: %d of %d tensors from %s", len(kept), len(own), weights)


def load_classifier_backbone(
    backbone: torch.nn.Module, cam_train_dir: Path | None, who: str
) -> None:
    """Copy this round's trained classifier backbone into `backbone` (`who`: the config key that
    asked, for the error). Image labels only, so the receiving stage stays weakly supervised.
    A CONTA classifier injecting M into a stage input has one extra (last) input channel there;
    the receiving net sees no M, so that channel is dropped."""
    weights_path = None if cam_train_dir is None else cam_train_dir / WEIGHTS_FILE
    if weights_path is None or not weights_path.is_file():
        raise MissingArtifactError(
            f"{who}=cam starts from this round's classifier, but {weights_path or WEIGHTS_FILE} "
            f"is missing. Fix: add train_cam to `stages`, or set {who}=pretrained."
        )
    state = read_weights(weights_path, "train_cam")
    own = backbone.state_dict()
    weights = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    weights = {
        k: v[:, : own[k].shape[1]] if k in own and v.ndim == 4 and v.shape != own[k].shape else v
        for k, v in weights.items()
    }
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise MissingArtifactError(
            f"{who}=cam: the classifier backbone in {weights_path} does not fit this backbone "
            f"(different arch or widths?): {err}"
        ) from err


def load_cam_classifier(
    cfg: DictConfig, train_dir: Path, confounders: Confounders | None = None
) -> CAMClassifier:
    weights = train_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingArtifactError(
            f"{weights} is missing: re-run the train_cam stage of this round"
        )
    module = build_cam_classifier(cfg, confounders)
    try:
        module.net.load_state_dict(read_weights(weights, "train_cam"))
    except RuntimeError as err:
        raise MissingArtifactError(
            f"{weights} does not fit cam.net={cfg.cam.net._target_} (method={_method(cfg)}): "
            f"it was trained by another method or architecture ({str(err).splitlines()[0]}). "
            "Fix: run with the method that trained it, or redo the classifier "
            "(force=[train_cam])."
        ) from err
    return module


def _method(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "method.name", default="?"))


def make_cams(ctx: StageContext) -> StageResult:
    """Multi-scale + flip CAMs for every training image, one .npz per image (resumable)."""
    cfg = ctx.cfg
    confounders = previous_confounders(ctx)
    module = load_cam_classifier(cfg, ctx.inputs["classifier"], confounders)
    out_dir = ctx.dir / CAM_DIR
    dataset = classifier_inference_set(cfg, confounders)
    if confounders is not None and is_global_zero():
        context_figure(module, dataset, confounders, ctx)
    # Resume: the CAMs an interrupted attempt wrote are complete (see missing_items) and kept.
    todo = missing_items(dataset.ids, (out_dir, ".npz"))
    barrier()  # every rank has listed the same todo before any rank writes
    log.info("make_cams: %d of %d images to do", len(todo), len(dataset))
    if todo:
        loader = inference_loader(
            Subset(dataset, todo), cfg.cam.inference.batch_size, cfg.num_workers, collate_same_size
        )
        store = cfg.cam.inference.store
        writer = NpzPredictionWriter(out_dir, cam_encoder(store), compress=store == "uint8")
        trainer = build_trainer(cfg, ctx.dir, [], training=False, callbacks=[writer])
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    barrier()  # every rank's shard is on disk before the count
    resume = resume_counts(dataset.ids, todo, (out_dir, ".npz"))
    return StageResult(metrics={"images": len(dataset), "resume": resume}, artifacts=[CAM_DIR])


def load_cam(cam_dir: Path, image_id: str) -> dict[str, np.ndarray]:
    path = cam_dir / f"{image_id}.npz"
    if not path.is_file():
        raise MissingArtifactError(
            f"CAM file {path} for image {image_id!r} is missing: the make_cams stage did not cover "
            f"this id (was data.eval_split changed?). Re-run with force=[make_cams]."
        )
    src = Source(path, "delete it and re-run make_cams (force=[make_cams])", CamFileError)
    return checked_cam(decode_cam(read_npz(src, CAM_ARRAYS), src), src)


class CamFileError(MissingArtifactError, ValueError):
    """A CAM file that is not what make_cams writes (a MissingArtifactError, as a missing one
    is; a ValueError, as the NaN checks of its readers were)."""


def checked_cam(cam: dict[str, np.ndarray], src: Source) -> dict[str, np.ndarray]:
    """A decoded CAM file as make_cams writes it, else `src.fail` naming the file: keys are
    distinct 1-based object class ids, and each map is one finite plane in [0, 1] per key."""
    keys = cam["keys"]
    if keys.ndim != 1:
        src.fail(f"array 'keys' has shape {keys.shape}, expected one class id per map")
    shown = keys[:20].tolist()
    if keys.size and (keys.min() < 1 or keys.max() > MAX_CLASS_KEY):
        src.fail(f"keys {shown} must be 1-based object class ids in 1..{MAX_CLASS_KEY}")
    if np.unique(keys).size != keys.size:
        src.fail(f"keys {shown} repeat a class")
    for name in CAM_MAPS:
        maps = cam[name]
        if maps.ndim != 3 or maps.shape[0] != keys.size:
            src.fail(f"array {name!r} has shape {maps.shape}, expected ({keys.size}, H, W)")
        if not np.isfinite(maps).all():
            src.fail(f"array {name!r} contains NaN or inf")
        if maps.size and (maps.min() < 0 or maps.max() > 1 + _RANGE_SLACK):
            low, high = float(maps.min()), float(maps.max())
            src.fail(f"array {name!r} spans [{low:.4g}, {high:.4g}], expected [0, 1]")
    return cam


def checked_high_res(cam: dict, image_id: str, cam_dir: Path, size: tuple[int, int]) -> np.ndarray:
    """A loaded CAM's full-resolution maps, finite and of the image's `size` (H, W)."""
    high_res = cam["high_res"]
    if not np.isfinite(high_res).all():
        raise ValueError(
            f"CAM of image {image_id!r} ({cam_dir}) contains NaN/inf: re-run make_cams"
        )
    if high_res.shape[1:] != size:
        raise MissingArtifactError(
            f"CAM of image {image_id!r} is {high_res.shape[1:]} but the image is {size}"
        )
    return high_res


def eval_cams(ctx: StageContext) -> StageResult:
    """CAM mIoU on the evaluation split with a background-threshold sweep, errors and leakage;
    sharded over the ranks (each scores its share, the confusion counts are summed)."""
    cfg = ctx.cfg
    cam_dir = ctx.inputs["cams"] / CAM_DIR
    with ctx.settle():
        dataset = build_dataset(cfg.data, cfg.data.eval_split)
        sweep = ThresholdSweep(
            [float(t) for t in cfg.cam.eval.sweep],
            num_classes=cfg.data.num_classes,
            class_names=list(dataset.class_names),
            configured_threshold=cfg.cam.eval.bg_threshold,
            context_names=_context_names(dataset),
            process_group=metric_group(),
        )
        for i in my_share(range(len(dataset))):
            high_res, keys, mask = _scored_cam(dataset, cam_dir, i)
            sweep.update(high_res, keys, mask, dataset.load_context(i))
    summary = sweep.compute()  # sums every rank's counts

    def figure() -> Path:
        rows = []
        for i in range(min(cfg.figure_images, len(dataset))):
            high_res, keys, mask = _scored_cam(dataset, cam_dir, i)
            rows.append(
                {
                    "image": dataset.load_image(i),
                    "CAM": high_res.max(axis=0) if len(high_res) else np.zeros(mask.shape),
                    "CAM label": cam_to_label(high_res, keys, cfg.cam.eval.bg_threshold),
                    "GT": mask,
                }
            )
        title = f"round {ctx.round}: CAMs"
        return overlay_grid(rows, list(dataset.class_names), ctx.dir / "cams.png", title=title)

    log_figure(ctx.loggers, "cam/overlays", run_on_rank_zero(figure, f"{ctx.name}: figure"))
    results = _cam_results(summary)
    return StageResult(metrics=results, artifacts=["cams.png"], results=results, prefix="cam")


def _scored_cam(dataset, cam_dir: Path, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image i's full-resolution CAMs, their class keys and its ground-truth mask."""
    image_id = dataset.ids[i]
    cam = load_cam(cam_dir, image_id)
    high_res = cam["high_res"]
    mask = dataset.load_mask(i)
    if high_res.shape[1:] != mask.shape:
        raise MissingArtifactError(
            f"CAM {cam_dir / image_id}.npz has size {high_res.shape[1:]} but the mask is "
            f"{mask.shape}: the CAMs come from another data set; re-run make_cams"
        )
    return high_res, cam["keys"], mask


def _context_names(dataset) -> list[str] | None:
    return list(getattr(dataset, "context_names", None) or []) or None


def _cam_results(summary: dict) -> dict:
    at = summary["at_configured"]
    return {
        "miou": at["miou"],
        "threshold": summary["configured_threshold"],
        "best_miou": summary["best_miou"],
        "best_threshold": summary["best_threshold"],
        "errors": at["errors"],
        "per_class_iou": at["per_class_iou"],
        **({"context_leakage": at["context_leakage"]} if "context_leakage" in at else {}),
        "sweep": dict(zip(summary["thresholds"], summary["miou_per_threshold"], strict=True)),
    }
