"""Figures: label/CAM overlays on images and metric curves (PNG).

Uses matplotlib's object API (``Figure`` + Agg) rather than pyplot: no global backend switch,
no window, nothing to close, safe in worker processes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from src.datamodules.palette import VOC_PALETTE, colorize, voc_palette  # noqa: F401 (re-exported)

VOID = 255
_VOID_RGB = np.array([255, 255, 255], dtype=np.float32)  # ignore/void drawn white in overlays


def _as_rgb(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if image.dtype.kind == "f":  # tolerate [0, 1] float images
        image = np.clip(image * 255.0, 0, 255)
    return image.astype(np.uint8)


def _blend_labels(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Object ids blended over the image, background left as is, void painted white."""
    out = image.astype(np.float32)
    colour = colorize(labels).astype(np.float32)
    obj = (labels > 0) & (labels != VOID)
    out[obj] = (1 - alpha) * out[obj] + alpha * colour[obj]
    out[labels == VOID] = _VOID_RGB
    return out.astype(np.uint8)


def _blend_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    heat = np.nan_to_num(np.clip(heat.astype(np.float32), 0.0, 1.0))
    colour = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    return ((1 - alpha) * image.astype(np.float32) + alpha * colour).astype(np.uint8)


def _render_panel(image: np.ndarray, panel: Any, where: str, alpha: float) -> np.ndarray:
    panel = np.asarray(panel)
    if panel.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"{where} has shape {panel.shape}, image is {image.shape[:2]}; resize it to the image"
        )
    if panel.ndim == 3:  # already an RGB picture
        return _as_rgb(panel)
    if panel.dtype.kind == "f":
        return _blend_heatmap(image, panel)
    return _blend_labels(image, panel, alpha)


def _save_atomic(fig: Figure, out_path: str | os.PathLike, dpi: int) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def overlay_grid(
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    out_path: str | os.PathLike,
    title: str | None = None,
    alpha: float = 0.6,
    cell_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """One row per image: the image, then each named panel in columns (titled).

    Panels: float (H, W) in [0, 1] -> jet heatmap over the image (a CAM); integer (H, W) -> label
    map in VOC colours over the image (255 white); (H, W, 3) -> shown as is. Columns are the union
    of panel names in first-seen order; a row lacking a panel leaves that cell empty. A legend
    lists the classes that appear in any label map. Size: about ``cell_inches * dpi`` pixels per
    column, rows scaled by the first image's aspect ratio.
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k != "image" and k not in columns]
    columns = ["Image", *columns]
    h, w = np.asarray(rows[0]["image"]).shape[:2]
    cell_h = cell_inches * h / w
    fig = Figure(
        figsize=(cell_inches * len(columns), cell_h * len(rows) + 0.6), layout="constrained"
    )
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    seen: set[int] = set()
    for i, row in enumerate(rows):
        image = _as_rgb(row["image"])
        for j, name in enumerate(columns):
            ax = axes[i, j]
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
            panel = image if name == "Image" else row.get(name)
            if panel is None:
                continue
            panel = np.asarray(panel)
            rendered = _render_panel(image, panel, f"row {i} panel {name!r}", alpha)
            ax.imshow(rendered, interpolation="nearest")
            if name != "Image" and panel.ndim == 2 and panel.dtype.kind in "biu":
                seen.update(int(v) for v in np.unique(panel))
    handles = [
        Patch(
            color=VOC_PALETTE[c] / 255.0, label=class_names[c] if c < len(class_names) else str(c)
        )
        for c in sorted(seen - {0, VOID})
    ]
    if VOID in seen:
        handles.append(Patch(facecolor="white", edgecolor="black", label="void"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8))
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, out_path, dpi)


def curve_plot(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    out_path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str,
    marks: Mapping[str, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Line plot of several series over ``xs`` (threshold sweeps, per-round curves).

    ``None`` values are gaps. ``marks`` draws labelled vertical lines, e.g. the configured and the
    best threshold.
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    xs = np.asarray(xs, dtype=np.float64)
    for name, ys in series.items():
        ys = np.array([np.nan if y is None else y for y in ys], dtype=np.float64)
        if ys.shape != xs.shape:
            raise ValueError(f"series {name!r} has {ys.size} values for {xs.size} xs")
        ax.plot(xs, ys, marker="o" if xs.size <= 20 else None, markersize=3, label=name)
    for k, (name, x) in enumerate((marks or {}).items()):
        ax.axvline(x, linestyle="--", color=f"C{k + len(series)}", label=f"{name} = {x:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_atomic(fig, out_path, dpi)


_BG_CUE_RGB = np.array([0, 200, 255], dtype=np.float32)  # background cues: a light blue


def _cells_to_pixels(cues: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, gh, gw) cue grid -> (C, H, W): the grid covers the whole image, cell (i, j) is the
    block [i H/gh, (i+1) H/gh) x [j W/gw, (j+1) W/gw) (nearest: cells stay visible as blocks)."""
    gh, gw = cues.shape[1:]
    rows = np.arange(size[0]) * gh // size[0]
    cols = np.arange(size[1]) * gw // size[1]
    return cues[:, rows][:, :, cols]


def cue_figure(
    images: Sequence[Any],
    cues_list: Sequence[np.ndarray],
    class_names: Sequence[str],
    out_path: str | os.PathLike,
    title: str | None = None,
    palette: np.ndarray | None = None,
    alpha: float = 0.6,
    cell_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """SEC/DSRG localization cues, one row per image: image | background cues | foreground cues.

    ``cues_list``: bool (num_classes, gh, gw) per image, channel 0 = background
    (``src.postprocess.cues.assemble_cues``), on a grid covering the whole image; cells are drawn
    as blocks over the image. Background cues in light blue; a foreground cell in its class's
    colour (``palette``, default VOC's), a cell with several classes in the mean of their colours.
    The legend lists the classes with a cue in any row. Saved atomically like ``overlay_grid``."""
    if not images or len(images) != len(cues_list):
        raise ValueError(
            f"cue_figure needs as many cue arrays as images (at least one), got {len(images)} "
            f"images and {len(cues_list)} cue arrays"
        )
    palette = VOC_PALETTE if palette is None else np.asarray(palette)
    columns = ["Image", "Background cues", "Foreground cues"]
    h, w = np.asarray(images[0]).shape[:2]
    fig = Figure(
        figsize=(cell_inches * len(columns), cell_inches * h / w * len(images) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    seen: set[int] = set()
    for i, (image, cues) in enumerate(zip(images, cues_list, strict=True)):
        image = _as_rgb(image)
        cues = np.asarray(cues, dtype=bool)
        if cues.ndim != 3 or cues.shape[0] < 1 or cues.shape[0] > len(palette):
            raise ValueError(
                f"row {i}: cues must be (num_classes, gh, gw) with num_classes <= "
                f"{len(palette)}, got shape {cues.shape}"
            )
        pixels = _cells_to_pixels(cues, image.shape[:2])
        base = image.astype(np.float32)
        bg = base.copy()
        bg[pixels[0]] = (1 - alpha) * bg[pixels[0]] + alpha * _BG_CUE_RGB
        fg_pixels = pixels[1:].astype(np.float32)  # (C-1, H, W)
        count = fg_pixels.sum(axis=0)
        colour = np.einsum("chw,ck->hwk", fg_pixels, palette[1 : len(cues)].astype(np.float32))
        has = count > 0
        fg = base.copy()
        fg[has] = (1 - alpha) * fg[has] + alpha * colour[has] / count[has][:, None]
        seen.update(int(c) + 1 for c in np.flatnonzero(cues[1:].any(axis=(1, 2))))
        for j, panel in enumerate((image, bg.astype(np.uint8), fg.astype(np.uint8))):
            ax = axes[i, j]
            ax.set_axis_off()
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
            ax.imshow(panel, interpolation="nearest")
    handles = [Patch(color=_BG_CUE_RGB / 255.0, label="background cue")]
    handles += [
        Patch(color=palette[c] / 255.0, label=class_names[c] if c < len(class_names) else str(c))
        for c in sorted(seen)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8))
    if title:
        fig.suptitle(title)
    return _save_atomic(fig, out_path, dpi)
