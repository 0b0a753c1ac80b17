"""`predict(cfg)`: segmentation masks for one image or a folder from a trained segmenter checkpoint.

The testable entry point behind ``python predict.py`` (the Hydra shim only calls it)::

    python predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=DIR \
        [device=auto|cpu|cuda] [crf=false] [overlay=true] [scales=null] [amp=false]

``checkpoint`` is the ``segmenter.pt`` written by the train_segmenter stage
(:func:`src.models.deeplab.save_segmenter`); it carries the backbone config, class names,
normalisation and MSC scales, so no experiment config is needed. ``input`` is one image (any
format PIL decodes) or a folder: every file directly in it (not recursive) whose extension is one
of jpg, jpeg, png, bmp, webp (any case), in sorted order. For each image ``output`` gets

* ``<stem>.png``: the label map as a VOC palette PNG holding class ids 0..num_classes-1;
* ``<stem>_overlay.png`` (``overlay=true``): the image, then the image blended with the
  coloured mask (background left as is), side by side, with a legend of the object classes
  present.

Two images with the same stem (``a.jpg``, ``a.png``) are written as ``a_jpg.png``/``a_png.png``.
A plan in which an output would overwrite an input image or another output is refused before
anything is written. Every file is written atomically (temp file + rename), so an interrupted run
leaves only complete files. Hydra writes its job log to ``output/predict.log`` and creates no
timestamped folder.

Inference runs on the whole image: MSC logits (pixel-wise max over the checkpoint's scales),
upsampled bilinearly to the image size, argmax; ``crf=true`` refines the softmax with the
deeplab-pytorch dense CRF first. ``device=auto`` picks CUDA when available; ``amp=true``
runs the net under bf16 autocast there (off by default: no faster on an H100, see README).

Errors and exit status of the CLI:

* 0: every image was written.
* 1: some images could not be read or predicted. Each is logged as an error naming the file,
  the other images are still done, and the run ends with ``N images, K written, F failed`` and
  the list of failures.
* 2: nothing was done: the checkpoint is missing, unreadable, not a segmenter checkpoint or does
  not fit its model (:class:`~src.models.deeplab.CheckpointError`), or the input path is missing,
  a folder holds no image, the device is unavailable, or the outputs would collide
  (:class:`PredictError`). The message names the path and the fix.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont

from src.datamodules.palette import IGNORE_INDEX, colorize, save_label_png
from src.datamodules.transforms import eval_transform
from src.datamodules.validation import DatasetError, read_rgb
from src.models.deeplab import CheckpointError, load_segmenter, msc_logits
from src.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OVERLAY_SUFFIX = "_overlay"


class PredictError(ValueError):
    """Bad input, output or device for `predict`; raised before any image is read."""


# --------------------------------------------------------------------------------------- planning
def list_images(input_path: str | Path) -> list[Path]:
    """The image itself, or the image files directly in a folder (by extension, sorted)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(
            p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise PredictError(
                f"input folder {path} holds no image (looked for "
                f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)} files, not in sub-folders). "
                "Fix: point input= at an image or a folder of images."
            )
        return images
    raise PredictError(
        f"input {path} does not exist. Fix: set input=/path/to/image.jpg or input=/path/to/folder."
    )


def plan_outputs(images: Sequence[Path], out_dir: Path) -> list[str]:
    """Output name (without .png) of each image: its stem, or stem_ext where stems collide.

    Raises PredictError when a planned file would overwrite an input image or another output.
    """
    stems = Counter(p.stem for p in images)
    names = [
        p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in images
    ]
    inputs = {p.resolve(): p for p in images}
    planned: dict[Path, Path] = {}
    for image, name in zip(images, names, strict=True):
        for suffix in ("", OVERLAY_SUFFIX):
            target = (out_dir / f"{name}{suffix}.png").resolve()
            if target in inputs:
                clash = f"the input image {inputs[target]}"
            elif target in planned:
                clash = f"the output for {planned[target]}"
            else:
                planned[target] = image
                continue
            raise PredictError(
                f"output {target} (for {image}) would overwrite {clash}. Fix: choose an "
                "output= folder other than the input folder, or rename the clashing images."
            )
    return names


def resolve_device(name: str) -> torch.device:
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PredictError(f"device={name!r} is not a device; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(
            f"device={name} was asked for but CUDA is not available; use device=auto or device=cpu"
        )
    return device


# -------------------------------------------------------------------------------------- inference
def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) float32, normalised as the pipeline's eval transform does."""
    return eval_transform(mean, std)(image=image)["image"][None]


def predict_logits(
    net: torch.nn.Module,
    image: np.ndarray,
    spec: dict[str, Any],
    scales: Sequence[float],
    device: torch.device,
    amp: bool = True,
) -> torch.Tensor:
    """(C, H, W) float32 logits at the image's own size (MSC max, bilinear upsampling)."""
    x = normalize(image, spec["mean"], spec["std"]).to(device)
    use_amp = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = msc_logits(net, x, scales, training=False)
        logits = F.interpolate(
            logits.float(), size=image.shape[:2], mode="bilinear", align_corners=False
        )
    return logits[0]


def predict_mask(
    net: torch.nn.Module,
    image: np.ndarray,
    spec: dict[str, Any],
    scales: Sequence[float],
    device: torch.device,
    crf: bool = False,
    amp: bool = True,
) -> np.ndarray:
    """HxW uint8 class ids of one HxWx3 uint8 image."""
    logits = predict_logits(net, image, spec, scales, device, amp)
    if not crf:
        return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
    from src.postprocess.crf import DEEPLAB_CRF, crf_refine_logits  # pydensecrf only if asked

    return crf_refine_logits(image, logits, DEEPLAB_CRF)


# ---------------------------------------------------------------------------------------- overlay
def _blend(image: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """Object classes blended over the image in VOC colours; background left as is."""
    out = image.astype(np.float32)
    colour = colorize(mask).astype(np.float32)
    obj = (mask > 0) & (mask != IGNORE_INDEX)
    out[obj] = (1 - alpha) * out[obj] + alpha * colour[obj]
    return out.astype(np.uint8)


def _legend(classes: Sequence[int], class_names: Sequence[str], width: int) -> Image.Image | None:
    """A white strip with a colour swatch and the name of each class, wrapped to `width`."""
    if not classes:
        return None
    font = ImageFont.load_default()
    pad, box, row_h = 6, 12, 18
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, y = [], pad, pad
    for c in classes:
        label = class_names[c] if c < len(class_names) else str(c)
        w = box + 4 + int(probe.textlength(label, font=font)) + 2 * pad
        if x + w > width and x > pad:
            x, y = pad, y + row_h
        items.append((x, y, c, label))
        x += w
    strip = Image.new("RGB", (width, y + row_h + pad), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, c, label in items:
        draw.rectangle([x, y + 2, x + box, y + 2 + box], fill=tuple(int(v) for v in colorize(c)))
        draw.text((x + box + 4, y + 1), label, fill="black", font=font)
    return strip


def overlay_png(
    image: np.ndarray, mask: np.ndarray, class_names: Sequence[str], alpha: float = 0.6
) -> bytes:
    """PNG bytes of [image | image blended with the mask], a legend of present classes below."""
    pair = np.concatenate([image, _blend(image, mask, alpha)], axis=1)
    canvas = Image.fromarray(pair)
    present = [int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX)]  # 0: not coloured
    legend = _legend(present, class_names, canvas.width)
    if legend is not None:
        full = Image.new("RGB", (canvas.width, canvas.height + legend.height), "white")
        full.paste(canvas, (0, 0))
        full.paste(legend, (0, canvas.height))
        canvas = full
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- main
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Masks (and overlays) for `cfg.input` into `cfg.output` from `cfg.checkpoint`.

    Raises CheckpointError / PredictError before any image is read when the checkpoint, input,
    device or output plan is bad. An image that cannot be read or predicted is logged and
    skipped. Returns ``{"images": N, "written": K, "failed": F, "failures": [{"path", "error"}],
    "masks": [...], "overlays": [...], "output_dir", "device", "checkpoint"}``.
    """
    missing = [k for k in ("checkpoint", "input", "output") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise PredictError(
            f"{', '.join(missing)} not set. Usage: python predict.py checkpoint=PATH "
            "input=IMAGE_OR_FOLDER output=DIR [device=auto|cpu|cuda] [crf=false] [overlay=true]"
        )
    images = list_images(cfg.input)
    out_dir = Path(cfg.output).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"output {out_dir} exists and is not a folder. Fix: set output=DIR.")
    names = plan_outputs(images, out_dir)
    device = resolve_device(cfg.get("device", "auto"))
    crf = bool(cfg.get("crf", False))
    overlay = bool(cfg.get("overlay", True))
    amp = bool(cfg.get("amp", True))
    alpha = float(cfg.get("overlay_alpha", 0.6))

    net, spec = load_segmenter(cfg.checkpoint)
    num_classes = int(spec["num_classes"])
    if num_classes > IGNORE_INDEX:
        raise CheckpointError(
            f"{cfg.checkpoint}: {num_classes} classes do not fit a palette PNG (at most 255)"
        )
    scales = list(cfg.get("scales") or spec["scales"])
    class_names = list(spec["class_names"])
    net = net.to(device)
    log.info(
        "predicting %d image(s) from %s into %s on %s (scales %s, crf %s)",
        len(images), cfg.checkpoint, out_dir, device, scales, crf,
    )  # fmt: skip

    masks, overlays, failures = [], [], []
    for i, (path, name) in enumerate(zip(images, names, strict=True), 1):
        try:
            image = read_rgb(path)
            mask = predict_mask(net, image, spec, scales, device, crf=crf, amp=amp)
            mask_path = out_dir / f"{name}.png"
            save_label_png(mask_path, mask)
            if overlay:
                overlay_path = out_dir / f"{name}{OVERLAY_SUFFIX}.png"
                atomic_write_bytes(overlay_path, overlay_png(image, mask, class_names, alpha))
                overlays.append(str(overlay_path))
            masks.append(str(mask_path))
            log.info("[%d/%d] %s -> %s", i, len(images), path, mask_path)
        except DatasetError as err:  # undecodable or vanished file
            cause = err.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
            message = f"cannot read image {path} ({reason})"
            log.error("[%d/%d] %s", i, len(images), message)
            failures.append({"path": str(path), "error": message})
        except Exception as err:  # e.g. out of memory on a huge image: go on with the others
            log.exception("[%d/%d] %s failed", i, len(images), path)
            failures.append({"path": str(path), "error": f"{type(err).__name__}: {err}"})

    result = {
        "images": len(images),
        "written": len(masks),
        "failed": len(failures),
        "failures": failures,
        "masks": masks,
        "overlays": overlays,
        "output_dir": str(out_dir),
        "device": str(device),
        "checkpoint": str(cfg.checkpoint),
    }
    summary = f"{result['images']} images, {result['written']} written, {result['failed']} failed"
    if failures:
        listing = "".join(f"\n  {f['path']}: {f['error']}" for f in failures)
        log.error("%s:%s", summary, listing)
    else:
        log.info(summary)
    return result
