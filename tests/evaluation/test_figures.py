"""Overlay grids, curves and the VOC palette."""

import numpy as np
import pytest
from PIL import Image

from src.evaluation.figures import (
    _cells_to_pixels,
    colorize,
    cue_figure,
    curve_plot,
    overlay_grid,
    voc_palette,
)


def test_voc_palette_and_colorize():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(
        pal[[0, 1, 15, 255]], [[0, 0, 0], [128, 0, 0], [192, 128, 128], [224, 224, 192]]
    )
    assert voc_palette(21).shape == (21, 3)
    rgb = colorize(np.array([[0, 1], [15, 255]], dtype=np.uint8))
    assert rgb.shape == (2, 2, 3) and tuple(rgb[1, 0]) == (192, 128, 128)


def test_overlay_grid_writes_png_of_expected_size(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 48, 64
    rows = []
    for _ in range(2):
        gt = np.zeros((h, w), np.uint8)
        gt[10:30, 20:40] = 15
        gt[0:2] = 255
        rows.append(
            {
                "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                "CAM": rng.random((h, w)).astype(np.float32),
                "CAM label": (gt == 15).astype(np.uint8) * 15,
                "GT": gt,
            }
        )
    rows[1]["pseudo-mask"] = rows[1]["GT"]  # a later stage's column; empty in row 0
    names = [f"class_{i}" for i in range(21)]
    out = overlay_grid(rows, names, tmp_path / "figs" / "grid.png", title="round 0")
    assert out.is_file() and out.stat().st_size > 1000
    with Image.open(out) as im:
        width, height = im.size
    assert width == pytest.approx(5 * 2.5 * 100, rel=0.05)  # 5 columns incl. the image
    assert height == pytest.approx((2 * 2.5 * h / w + 0.6) * 100, rel=0.05)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_overlay_grid_rejects_mismatched_panel(tmp_path):
    row = {"image": np.zeros((8, 8, 3), np.uint8), "GT": np.zeros((4, 4), np.uint8)}
    with pytest.raises(ValueError, match="GT"):
        overlay_grid([row], ["bg"], tmp_path / "x.png")


def test_curve_plot_writes_png(tmp_path):
    xs = [0.0, 0.1, 0.2, 0.3]
    out = curve_plot(
        xs,
        {"round 0": [0.3, 0.4, None, 0.35], "round 1": [0.32, 0.45, 0.5, 0.4]},
        tmp_path / "sweep.png",
        xlabel="background threshold",
        ylabel="mIoU",
        title="CAM threshold sweep",
        marks={"configured": 0.15},
    )
    with Image.open(out) as im:
        assert im.size == (640, 400)


def test_cue_figure_writes_png_with_cells_as_blocks(tmp_path):
    rng = np.random.default_rng(0)
    h, w, grid = 40, 60, (4, 6)
    cues = np.zeros((21, *grid), bool)
    cues[0, 3, :] = True  # background: the bottom row of cells
    cues[15, 1, 2] = cues[15, 1, 3] = True  # person
    cues[12, 1, 3] = True  # dog shares a cell with the person
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.zeros((h, w, 3), np.uint8)]
    empty = np.zeros((21, *grid), bool)
    out = cue_figure(images, [cues, empty], [f"c{i}" for i in range(21)], tmp_path / "cues.png")
    assert [p.name for p in tmp_path.iterdir()] == ["cues.png"]  # atomic: no temp file left
    with Image.open(out) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(out) as im:
        width, height = im.size
    assert width == pytest.approx(3 * 2.5 * 100, rel=0.05)  # image | background | foreground
    assert height == pytest.approx((2 * 2.5 * h / w + 0.6) * 100, rel=0.05)
    # each cell becomes the block of pixels it covers (the grid spans the whole image)
    pixels = _cells_to_pixels(cues, (h, w))
    assert pixels.shape == (21, h, w)
    assert pixels[0, 30:].all() and not pixels[0, :30].any()
    assert pixels[12, 10:20, 30:40].all() and pixels[12].sum() == 100
    with pytest.raises(ValueError, match="as many"):
        cue_figure(images, [cues], ["bg"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="row 0"):
        cue_figure(images[:1], [cues[0]], ["bg"], tmp_path / "x.png")
