"""Embedded synthetic data set with a built-in, selectable confounder (the product's CPU demo).

Six shape classes (by default; up to twelve, see "Off the home set" below), each with its own
fill pattern, sit on a background. Every class k has a
"home": a home context texture (``HOME_CONTEXT``) and, for the layout confounder, a home position
and partner region (``HOME_LAYOUT``). In train an object is "at home" with probability ``p_home``
(0.9), in val with ``p_home_val`` (0.5), so in train the home predicts the class almost perfectly
and a classifier's CAM can leak onto it. ``data.generator.confounder`` picks what "home" means:

* ``texture`` (the default of ``ensure_synthetic_voc``, the set's original bias): objects are
  placed uniformly at random; at home a large wobbly region of class k's context texture
  surrounds the object, otherwise the region is another class's context (half of the remaining
  cases) or absent (plain noisy background). The bias lives in *what surrounds* an object, so
  every class's average mask is the same centred blob.
* ``layout``: the bias lives in *where things are*. Class k's home anchor is a point of a 3x2 grid
  in normalised image coordinates (rows 0.3 / 0.7, columns 0.28 / 0.5 / 0.72), and its partner
  region is a rounded slab (above / below) or column (left / right) of class k's home texture,
  0.5-0.7 of the object's extent deep and tucked under the object's edge so it touches the shape,
  on a class-specific side (``HOME_LAYOUT``). Each image draws a latent layout: a global shift
  (dy, dx) of up to +-12% of the image shared by its objects, plus +-3% jitter per object. At home
  an object (the rider/mount pair as one group, anchored at the mount) is centred on its anchor +
  shift + jitter, moved just enough that it and its partner stay inside the image, and gets its
  partner region. Objects may hide at most 15% of each other (of the smaller shape); when the
  other object takes the spot, the nearest free spot up to 15% of the image away is used, then
  smaller objects are tried, and at last the object goes to a uniform spot without its partner
  (counted as not at home: two large objects at neighbouring anchors do not always fit, so the
  realised ``home_layout_rate`` is a little below ``p_home``, ~0.88 for 0.9). Away from home an
  object is placed uniformly (as for ``texture``) with another class's partner region (half of
  the cases, on that class's side) or none. All the rest is plain background. Because the bias
  is spatial, the per-class average masks differ (each class's mass sits near its anchor): this
  is the bias a spatial class prior, CONTA's confounder set C = per-class average segmentation
  masks, can represent; under ``texture`` every entry of C is the same centred blob. The team's
  ``conf/data/synth.yaml`` selects ``layout``.
* ``both``: ``layout`` plus ``texture`` driven by one draw per object: at home the object sits
  at its anchor with its partner region and today's wobbly home-texture region around it (the
  union carries k's texture); away from home it is placed uniformly with another class's
  surround + partner (half of the cases) or none.
* ``twins``: ``layout`` (same placement, partner regions and draws of p_home) where an object's
  appearance alone does not decide its class: classes 2j-1 and 2j (disc/square,
  triangle/cross, ring/diamond; hexagon/star, ...) are drawn with the same shape and fill
  pattern (those of 2j-1) and nearly the same colour: hues +-8 degrees around the pair's mean
  base hue, each jittered by +-12, so a third of each twin's hue range overlaps the other's.
  What tells twins apart is mainly their usual context (home anchor and partner texture, 90 %
  of train objects, 50 % of val), the paper's confounder (a context prior: where and next to
  what a class is usually seen), and a faint colour cue that pixel supervision can use.
* ``twins_same_hue``: ``twins`` with one hue distribution for both twins of a pair: nothing in
  an object's own pixels tells twins apart, only their context (home anchor, partner texture).

``ContextRegions/{id}.png`` marks every such region (surround or partner) with k (its label id,
see ``label_ids``), the class whose home texture it carries, on background pixels only, so the
leak is measurable. In addition the
"triangle" (rider) stands on top of the "square" (horse) with probability ``pair_prob``: the
horse-and-rider co-occurrence of VOC. meta.json's ``stats`` record, per split, the realised bias:
``home_context_rate`` (share of primary objects whose own region carries their home texture),
``home_layout_rate`` (share placed at their home anchor; 0 for ``texture``), and the centre of
mass of each class's average mask (``class_centroid``, normalised (y, x)), the per-image spread
of each class's centroid and the largest distance between two classes' centroids, and the
objects' sizes (``object_area`` mean / min / max of the full shapes, ``visible_area_mean``).

Off the home set: three more ``data.generator`` options make sets that differ from the default,
to check that a recipe tuned on it still holds (``conf/data/synth_small.yaml``,
``synth_many.yaml``, ``synth_voc21.yaml``; on plain ``data=synth`` add them with ``+``):

* ``object_area`` = [min, max] (default [0.10, 0.15]): the fraction of the image each object's
  full shape covers; objects that do not fit are shrunk, never below min.
* ``num_classes`` (6..12, default 6): the first K of ``ALL_CLASSES``. Classes 7..12 (hexagon,
  star, crescent, ellipse, chevron, bowtie) have their own fill patterns, base hues halfway
  between the first six's, home textures (brick, night, wood, tiles, lava, fabric), home anchors
  between the first six's (``ALL_HOME_LAYOUT``) and COCO ids.
* ``label_ids`` (default null = 1..K): the label value class k is written as, in both
  SegmentationClass and ContextRegions (distinct, in 1..254), e.g. 8 classes spread over the
  21-class VOC label space. meta.json's ``classes`` / ``contexts`` are indexed by that value
  (``unused_{id}`` for ids no class uses); the COCO export keeps one category per class.

The files follow the VOC 2012 layout (JPEGImages, SegmentationClass palette PNGs with a 2 px 255
band on object boundaries, ImageSets/Segmentation/{train,val}.txt) plus a COCO instances export
(annotations/instances_{train,val}.json with non-contiguous category ids, RLE visible-region
masks) and meta.json. Generation is deterministic: same arguments, same bytes (``texture`` gives
the same bytes as before the confounder option existed; the defaults of the options above give
the same images, masks, context maps and COCO files as before they existed, and meta.json only
gains the size stats: options at their defaults are left out of its ``generator`` record, so an
older folder still counts as complete).
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from src.datamodules.palette import IGNORE_INDEX, encode_label_png
from src.datamodules.validation import DatasetError
from src.utils.untrusted import read_json_object

log = logging.getLogger(__name__)

SYNTH_VERSION = 1
MIN_CLASSES, MAX_CLASSES = 6, 12  # data.generator.num_classes: object classes (background aside)
# All shape classes the generator can draw; a set of K classes uses the first K.
ALL_CLASSES = (
    "background",
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "star",
    "crescent",
    "ellipse",
    "chevron",
    "bowtie",
)
# ALL_CONTEXTS[k - 1] is the home context of class k; ContextRegions stores k's label id for it.
ALL_CONTEXTS = (
    "sky",
    "grass",
    "sand",
    "road",
    "water",
    "snow",
    "brick",
    "night",
    "wood",
    "tiles",
    "lava",
    "fabric",
)
# Layout confounder: class -> (home anchor = the object's centre in normalised (y, x), the side of
# the object where its partner region of the class's home texture sits). The first six form a
# 3x2 grid; classes 7..12 take points in between (the middles of its left and right columns, the
# centres of its four cells), all at least 0.149 from each other and far enough from the edges
# that the objects, with their partner regions, reach them.
ALL_HOME_LAYOUT = {
    "disc": ((0.30, 0.28), "below"),
    "ring": ((0.30, 0.50), "below"),
    "triangle": ((0.30, 0.72), "left"),
    "cross": ((0.70, 0.28), "above"),
    "square": ((0.70, 0.50), "right"),
    "diamond": ((0.70, 0.72), "above"),
    "hexagon": ((0.50, 0.28), "right"),
    "star": ((0.40, 0.39), "below"),
    "crescent": ((0.40, 0.61), "left"),
    "ellipse": ((0.60, 0.39), "above"),
    "chevron": ((0.60, 0.61), "above"),
    "bowtie": ((0.50, 0.72), "left"),
}
# Non-contiguous on purpose, like COCO's 1..90 for 80 classes: readers must map them to 1..K.
ALL_COCO_CATEGORY_IDS = (2, 4, 7, 9, 13, 17, 21, 24, 27, 31, 34, 38)
# The default six-class set (what conf/data/synth.yaml describes).
SYNTH_CLASSES = ALL_CLASSES[: MIN_CLASSES + 1]
SYNTH_CONTEXTS = ALL_CONTEXTS[:MIN_CLASSES]
HOME_CONTEXT = dict(zip(SYNTH_CLASSES[1:], SYNTH_CONTEXTS, strict=True))
HOME_LAYOUT = {c: ALL_HOME_LAYOUT[c] for c in SYNTH_CLASSES[1:]}
COCO_CATEGORY_IDS = ALL_COCO_CATEGORY_IDS[:MIN_CLASSES]
PAIR = {"mount": "square", "rider": "triangle"}  # rider stands on the mount, like horse & rider
CONFOUNDERS = ("texture", "layout", "both", "twins", "twins_same_hue")

_MOUNT = ALL_CLASSES.index(PAIR["mount"])
_RIDER = ALL_CLASSES.index(PAIR["rider"])
# Shape area in units of r^2 (r = the shape's size parameter): lets us sample by area fraction.
_AREA_COEF = {
    1: np.pi,
    2: 3.24,
    3: 1.8,
    4: 2.31,
    5: 0.75 * np.pi,
    6: 2.0,
    7: 1.5 * np.sqrt(3.0),  # regular hexagon of circumradius r
    8: 5 * 0.5 * np.sin(np.pi / 5),  # five-pointed star, outer radius r, inner 0.5 r
    9: 1.4507,  # crescent: disc r minus a disc 0.8 r shifted by 0.45 r (measured)
    10: 0.45 * np.pi,  # ellipse, semi-axes r and 0.45 r
    11: 1.4,  # chevron: a V band 2r wide and 0.7 r thick
    12: 2.0,  # bowtie: two triangles meeting in a 0.2 r waist
}
# Base hue per class, degrees: the first six 60 apart, the next six halfway between them.
_BASE_HUE = {k: 60.0 * (k - 1) if k <= 6 else 60.0 * (k - 7) + 30.0 for k in range(1, 13)}
_HUE_JITTER = 35.0  # > half the 60 degree spacing: colour helps but never decides alone
# twins: classes 2j-1 and 2j share the shape and fill pattern of class 2j-1; their hues sit
# +-offset around the pair's mean base hue, each jittered by +-_TWIN_HUE_JITTER: at 8 degrees
# a third of each twin's hue range overlaps the other's (colour helps a little, never decides);
# twins_same_hue: 0, one hue distribution for both (only context tells them apart).
_TWIN_HUE_OFFSETS = {"twins": 8.0, "twins_same_hue": 0.0}
_TWIN_HUE_JITTER = 12.0
# Default of data.generator.object_area: every object's full shape (before occlusion) covers
# 10-15% of the image; the shrink-to-fit logic never goes below the minimum.
_OBJECT_AREA = (0.10, 0.15)
# Bounds of object_area: at its minimum a group (the rider on its mount) must fit in the image.
_MAX_MIN_AREA, _MAX_OBJECT_AREA = 0.15, 0.25
_MIN_OBJECT_PIXELS = 30  # smaller shapes are not recognisable (the void band eats them)
_SHIFT = 0.12  # layout: per-image global shift of the home anchors, fraction of the image
_JITTER = 0.03  # ... plus a per-object jitter
_NEARBY = 0.15  # ... and how far from its anchor a home object may move to make room
_PARTNER_DEPTH = (0.5, 0.7)  # partner region depth, fraction of the object's extent
_PARTNER_ALONG = (1.0, 1.3)  # ... and its length along the object's side
_PARTNER_TUCK = 0.3  # fraction of the depth tucked under the object's edge: it touches the shape
_ANCHOR = {ALL_CLASSES.index(c): np.array(a, np.float64) for c, (a, _) in ALL_HOME_LAYOUT.items()}
_SIDE = {ALL_CLASSES.index(c): side for c, (_, side) in ALL_HOME_LAYOUT.items()}


@dataclass(frozen=True)
class SynthArgs:
    num_train: int = 320
    num_val: int = 96
    image_size: int = 96
    p_home: float = 0.9
    p_home_val: float = 0.5
    pair_prob: float = 0.7
    seed: int = 0
    confounder: str = "texture"
    num_classes: int = MIN_CLASSES
    object_area: tuple[float, float] = _OBJECT_AREA
    label_ids: tuple[int, ...] | None = None  # None: class k is written as k


# Options added after the first sets were made: left out of meta.json's "generator" record at
# their defaults, so such sets (same bytes) still count as complete.
_NEWER_OPTIONS = {"num_classes": MIN_CLASSES, "object_area": _OBJECT_AREA, "label_ids": None}


def _record(args: SynthArgs) -> dict:
    """meta.json's "generator" entry for ``args``, as JSON reads it back (lists, not tuples)."""
    record = asdict(args)
    for key, default in _NEWER_OPTIONS.items():
        if record[key] == default:
            del record[key]
    return json.loads(json.dumps(record))


def _check_options(
    num_classes, object_area, label_ids, image_size: int
) -> tuple[int, tuple[float, float], tuple[int, ...] | None]:
    """Validated, normalised (num_classes, object_area, label_ids): Hydra passes lists."""
    num_classes = _integer(num_classes, "num_classes")
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"data.generator.num_classes={num_classes} is out of range: the generator draws "
            f"{MIN_CLASSES}..{MAX_CLASSES} object classes ({', '.join(ALL_CLASSES[1:])}). Fix: "
            f"pick one in that range (and set data.num_classes = it + 1 for the background, with "
            f"as many data.class_names)."
        )
    try:
        lo, hi = (float(a) for a in object_area)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (0 < lo <= hi <= _MAX_OBJECT_AREA and lo <= _MAX_MIN_AREA):
        raise ValueError(
            f"data.generator.object_area={_show(object_area)} must be [min, max] fractions of the "
            f"image that one object's full shape covers, with 0 < min <= max, min <= "
            f"{_MAX_MIN_AREA} (a rider on its mount must fit in the image) and max <= "
            f"{_MAX_OBJECT_AREA}. Fix: e.g. data.generator.object_area=[0.03,0.06] (default "
            f"{list(_OBJECT_AREA)})."
        )
    if lo * image_size * image_size < _MIN_OBJECT_PIXELS:
        raise ValueError(
            f"data.generator.object_area min {lo} of a {image_size}px image is "
            f"{lo * image_size * image_size:.1f} pixels, too small to draw a shape. Fix: raise "
            f"the min to >= {_MIN_OBJECT_PIXELS / image_size**2:.4f} or data.generator.image_size."
        )
    if label_ids is not None:
        label_ids = _check_label_ids(label_ids, num_classes)
    return int(num_classes), (lo, hi), label_ids


def _check_label_ids(label_ids, num_classes: int) -> tuple[int, ...]:
    fix = (
        f"Fix: give {num_classes} distinct integers in 1..254 (0 is the background, 255 the void "
        f"band), one per class in the order {', '.join(ALL_CLASSES[1 : num_classes + 1])}, e.g. "
        f"data.generator.label_ids=[{','.join(map(str, range(1, 2 * num_classes, 2)))}], or null "
        "for 1..K; data.num_classes must then exceed the largest id."
    )
    try:
        ids = [_integer(i, "label_ids") for i in label_ids]
    except (TypeError, ValueError):
        raise ValueError(
            f"data.generator.label_ids={_show(label_ids)} is not a list of integers. {fix}"
        ) from None
    if len(ids) != num_classes:
        raise ValueError(
            f"data.generator.label_ids={_show(label_ids)} has {len(ids)} entries but "
            f"data.generator.num_classes={num_classes}. {fix}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"data.generator.label_ids={_show(label_ids)} repeats an id. {fix}")
    if not all(1 <= i <= 254 for i in ids):
        raise ValueError(
            f"data.generator.label_ids={_show(label_ids)} has an id outside 1..254. {fix}"
        )
    return tuple(ids)


def _integer(value, name: str) -> int:
    try:
        ok = not isinstance(value, bool | str) and int(value) == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"data.generator.{name}: {value!r} is not an integer")
    return int(value)


def _show(value) -> str:
    """``value`` as the user wrote it (a ListConfig shows as a plain list)."""
    if isinstance(value, str):
        return repr(value)
    try:
        return repr(list(value))
    except TypeError:
        return repr(value)


def _label_lut(num_classes: int, label_ids: tuple[int, ...] | None) -> np.ndarray | None:
    """uint8 look-up table class index -> label value written (None: identity)."""
    if label_ids is None:
        return None
    lut = np.arange(256, dtype=np.uint8)
    lut[1 : num_classes + 1] = label_ids
    return lut


def _value_names(names: list[str], label_ids: tuple[int, ...] | None) -> list[str]:
    """``names`` (entry k for class k, entry 0 for "none") re-indexed by the label value written:
    ids no class uses are named ``unused_{id}``."""
    if label_ids is None:
        return list(names)
    out = [names[0]] + [f"unused_{i}" for i in range(1, max(label_ids) + 1)]
    for k, i in enumerate(label_ids, start=1):
        out[i] = names[k]
    return out


# -- colours and textures --------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _context_texture(k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Full-size HxWx3 float texture of context k (1..12, see ALL_CONTEXTS)."""
    yy, xx = _grid(size)
    name = ALL_CONTEXTS[k - 1]
    if name == "sky":  # pale blue, lighter downwards, thin horizontal bands
        base = _hsv(0.58 + rng.uniform(-0.02, 0.02), rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.9))
        period, phase = rng.uniform(6, 9), rng.uniform(0, 2 * np.pi)
        shade = 0.9 + 0.15 * yy / size + 0.06 * np.sign(np.sin(2 * np.pi * yy / period + phase))
        tex = base * shade[..., None]
    elif name == "grass":  # green, vertical blade streaks
        base = _hsv(
            0.30 + rng.uniform(-0.03, 0.03), rng.uniform(0.55, 0.75), rng.uniform(0.45, 0.6)
        )
        noise = cv2.blur(rng.normal(0, 1, (size, size)).astype(np.float32), (1, 5))
        tex = base * (1 + 0.35 * noise)[..., None]
    elif name == "sand":  # beige with dark grains
        base = _hsv(0.11 + rng.uniform(-0.02, 0.02), rng.uniform(0.3, 0.45), rng.uniform(0.8, 0.9))
        dots = (rng.random((size, size)) < 0.07).astype(np.float32)
        tex = base * (1 - 0.45 * dots)[..., None]
    elif name == "road":  # dark grey with a light grid
        v = rng.uniform(0.35, 0.45)
        period = int(rng.integers(8, 12))
        oy, ox = rng.integers(0, period, size=2)
        lines = ((yy + oy) % period < 1) | ((xx + ox) % period < 1)
        tex = np.full((size, size, 3), v, np.float32) + 0.35 * lines[..., None]
    elif name == "water":  # blue-green waves
        base = _hsv(0.52 + rng.uniform(-0.02, 0.02), rng.uniform(0.6, 0.8), rng.uniform(0.5, 0.65))
        period, phase = rng.uniform(7, 10), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (yy / period + 0.25 * np.sin(2 * np.pi * xx / (2.5 * period))))
        tex = base * (1 + 0.3 * np.sin(wave * np.pi + phase))[..., None]
    elif name == "snow":  # near white with blue-grey speckle
        base = _hsv(0.6, rng.uniform(0.02, 0.08), rng.uniform(0.9, 0.97))
        speckle = (rng.random((size, size)) < 0.12).astype(np.float32)
        tex = base * (1 - 0.3 * speckle)[..., None]
    else:
        tex = _extra_texture(name, rng, size, yy, xx)
    return tex.astype(np.float32)


def _extra_texture(name: str, rng: np.random.Generator, size: int, yy, xx) -> np.ndarray:
    """The home contexts of classes 7..12 (a separate function: the first six stay as they were)."""
    if name == "brick":  # red-brown bricks in offset rows, light mortar
        base = _hsv(0.02 + rng.uniform(-0.01, 0.01), rng.uniform(0.6, 0.75), rng.uniform(0.5, 0.62))
        h = int(rng.integers(6, 9))
        w, oy, ox = 2 * h, int(rng.integers(0, h)), int(rng.integers(0, 2 * h))
        row = (yy + oy) // h
        mortar = ((yy + oy) % h < 1) | ((xx + ox + (row % 2) * h) % w < 1)
        tex = np.where(mortar[..., None], np.float32(0.8), base * rng.uniform(0.9, 1.1))
        tex = tex * (1 + 0.08 * rng.normal(0, 1, (size, size, 1)))
    elif name == "night":  # dark navy, sparse bright stars
        base = _hsv(0.65 + rng.uniform(-0.02, 0.02), rng.uniform(0.6, 0.8), rng.uniform(0.14, 0.2))
        stars = rng.random((size, size)) < 0.025
        tex = np.where(
            stars[..., None], np.float32(0.95), base * (1.1 - 0.2 * yy / size)[..., None]
        )
    elif name == "wood":  # brown with wavy vertical grain
        base = _hsv(
            0.08 + rng.uniform(-0.01, 0.01), rng.uniform(0.5, 0.65), rng.uniform(0.45, 0.55)
        )
        period, phase = rng.uniform(4, 6), rng.uniform(0, 2 * np.pi)
        bend = 2.5 * np.sin(2 * np.pi * yy / rng.uniform(25, 40) + phase)
        tex = base * (1 + 0.25 * np.sin(2 * np.pi * (xx + bend) / period))[..., None]
    elif name == "tiles":  # pink and cream checker with grey grout
        cell, oy, ox = int(rng.integers(9, 13)), *rng.integers(0, 12, size=2)
        a = _hsv(0.92 + rng.uniform(-0.02, 0.02), rng.uniform(0.35, 0.5), rng.uniform(0.8, 0.9))
        b = _hsv(0.12, rng.uniform(0.1, 0.2), rng.uniform(0.88, 0.95))
        check = ((yy + oy) // cell + (xx + ox) // cell) % 2 == 1
        grout = ((yy + oy) % cell < 1) | ((xx + ox) % cell < 1)
        tex = np.where(check[..., None], a, b)
        tex = np.where(grout[..., None], np.float32(0.5), tex)
    elif name == "lava":  # near black with glowing orange cracks
        dark = _hsv(0.0, rng.uniform(0.5, 0.7), rng.uniform(0.12, 0.18))
        glow = _hsv(0.06 + rng.uniform(-0.01, 0.02), rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
        field = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 3.0)
        crack = np.abs(field) < 0.12 * field.std()
        tex = np.where(crack[..., None], glow, dark)
    elif name == "fabric":  # violet woven cross-hatch
        base = _hsv(0.79 + rng.uniform(-0.02, 0.02), rng.uniform(0.45, 0.6), rng.uniform(0.55, 0.7))
        period = rng.uniform(4, 6)
        weave = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
        tex = base * (1 + 0.3 * weave)[..., None]
    else:  # pragma: no cover - ALL_CONTEXTS lists exactly the names above
        raise ValueError(f"unknown context {name!r}")
    return tex


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation random colour with a soft gradient and pixel noise: no context cue."""
    yy, xx = _grid(size)
    base = _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    tex = base * (1 + 0.2 * (ramp - 0.5))[..., None]
    return (tex + rng.normal(0, 0.04, tex.shape)).astype(np.float32)


# -- objects ---------------------------------------------------------------------------------
def _twin_look(cls: int, num_classes: int, offset: float) -> tuple[int, float]:
    """twins: the class whose shape and pattern ``cls`` is drawn with, and its hue centre (deg).
    A last class without a twin (odd num_classes) keeps its own look and base hue."""
    look = cls - 1 if cls % 2 == 0 else cls
    if look + 1 > num_classes:
        return cls, _BASE_HUE[cls]
    centre = (_BASE_HUE[look] + _BASE_HUE[look + 1]) / 2
    return look, centre + (offset if cls % 2 == 0 else -offset)


def _shape(
    cls: int, rng: np.random.Generator, r: float, look: int | None = None, hue: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, rgb) crops of one object of class ``cls`` with size parameter ``r``; ``look`` (the
    class whose shape and pattern it takes) and ``hue`` (its hue centre, jittered by
    _TWIN_HUE_JITTER) for the twins confounder, default its own (jittered by _HUE_JITTER)."""
    if look is not None:
        cls = look
    n = int(np.ceil(1.5 * r)) * 2 + 3
    c = n // 2
    yy, xx = _grid(n)
    theta = 0.0 if cls in (1, 5) else np.deg2rad(rng.uniform(-15, 15))
    # u, v: object-frame coordinates (rotated), so the pattern turns with the shape.
    u = (xx - c) * np.cos(theta) + (yy - c) * np.sin(theta)
    v = -(xx - c) * np.sin(theta) + (yy - c) * np.cos(theta)
    dist = np.hypot(u, v)
    if cls == 1:  # disc
        mask = dist <= r
    elif cls == 2:  # square
        mask = (np.abs(u) <= 0.9 * r) & (np.abs(v) <= 0.9 * r)
    elif cls == 3:  # triangle, apex up: base 2r, height 1.8r
        top = -0.9 * r
        mask = (v >= top) & (v <= 0.9 * r) & (np.abs(u) <= (v - top) / 1.8)
    elif cls == 4:  # cross
        arm = 0.35 * r
        mask = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    elif cls == 5:  # ring
        mask = (dist <= r) & (dist >= 0.5 * r)
    elif cls == 6:  # diamond
        mask = np.abs(u) + np.abs(v) <= r
    else:
        mask = _extra_shape_mask(cls, u, v, dist, r)

    if hue is None:
        hue = (_BASE_HUE[cls] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) / 360.0
    else:
        hue = ((hue + rng.uniform(-_TWIN_HUE_JITTER, _TWIN_HUE_JITTER)) % 360.0) / 360.0
    c1 = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    c2 = c1 * rng.uniform(0.3, 0.5)
    period = rng.uniform(5, 8)
    phase = rng.uniform(0, period)
    if cls == 1:  # horizontal stripes
        pattern = np.floor((v + phase) / (period / 2)) % 2 == 1
    elif cls == 2:  # checkerboard
        cell = period / 1.5
        pattern = (np.floor((u + phase) / cell) + np.floor((v + phase) / cell)) % 2 == 1
    elif cls == 3:  # vertical stripes
        pattern = np.floor((u + phase) / (period / 2)) % 2 == 1
    elif cls == 4:  # solid with a dark outline
        eroded = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8))
        pattern = mask & (eroded == 0)
    elif cls == 5:  # dots
        du, dv = (u + phase) % period - period / 2, (v + phase) % period - period / 2
        pattern = np.hypot(du, dv) < 0.3 * period
    elif cls == 6:  # diagonal stripes
        pattern = np.floor((u + v + phase) / (period / 2)) % 2 == 1
    else:
        pattern = _extra_pattern(cls, u, v, dist, period, phase)
    rgb = np.where(pattern[..., None], c2, c1).astype(np.float32)
    rgb += rng.normal(0, 0.03, rgb.shape).astype(np.float32)

    ys, xs = np.nonzero(mask)
    crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return mask[crop], rgb[crop]


def _extra_shape_mask(cls: int, u, v, dist, r: float) -> np.ndarray:
    """Masks of classes 7..12 in object-frame coordinates (u right, v down), size parameter r."""
    au, av = np.abs(u), np.abs(v)
    if cls == 7:  # hexagon, circumradius r, flat top
        return (av <= np.sqrt(3) / 2 * r) & (np.sqrt(3) * au + av <= np.sqrt(3) * r)
    if cls == 8:  # five-pointed star, apex up, outer radius r, inner radius 0.5 r
        sector = 2 * np.pi / 5
        phi = np.abs((np.arctan2(u, -v) + sector / 2) % sector - sector / 2)  # 0 at a tip
        px, py = dist * np.cos(phi), dist * np.sin(phi)
        bx, by = 0.5 * r * np.cos(sector / 2), 0.5 * r * np.sin(sector / 2)  # inner vertex
        # Inside: on the centre's side of the edge from the tip (r, 0) to the inner vertex.
        return (bx - r) * py - by * (px - r) >= 0
    if cls == 9:  # crescent: a disc with a shifted smaller disc bitten out, horns to the right
        return (dist <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    if cls == 10:  # ellipse: a bar with round ends, semi-axes r and 0.45 r
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1
    if cls == 11:  # chevron pointing up: a V band 2r wide, 0.7 r thick
        top = -0.8 * r + 0.8 * au
        return (au <= r) & (v >= top) & (v <= top + 0.7 * r)
    # bowtie: two triangles, tips towards the centre, joined by a 0.2 r waist
    return (au <= r) & (av <= 0.1 * r + 0.8 * au)


def _extra_pattern(cls: int, u, v, dist, period: float, phase: float) -> np.ndarray:
    """Fill patterns of classes 7..12 (True = the darker colour)."""
    if cls == 7:  # concentric rings
        return np.floor((dist + phase) / (period / 2)) % 2 == 1
    if cls == 8:  # eight radial sectors
        return np.floor((np.arctan2(v, u) + np.pi) / (np.pi / 4) + phase / period) % 2 == 1
    if cls == 9:  # anti-diagonal stripes
        return np.floor((u - v + phase) / (period / 2)) % 2 == 1
    if cls == 10:  # thin grid lines
        return ((u + phase) % period < 1.5) | ((v + phase) % period < 1.5)
    if cls == 11:  # wavy horizontal stripes
        wave = 0.25 * period * np.sin(2 * np.pi * u / period)
        return np.floor((v + wave + phase) / (period / 2)) % 2 == 1
    cell = period / 1.5  # bowtie: a checkerboard turned by 45 degrees
    return (np.floor((u + v + phase) / cell) + np.floor((u - v + phase) / cell)) % 2 == 1


def _group(
    classes: list[int],
    rng: np.random.Generator,
    size: int,
    area_scale: float,
    object_area: tuple[float, float] = _OBJECT_AREA,
    twins: tuple[int, float] | None = None,
):
    """Shapes of one group (a primary object, plus its rider standing on it) in group-local
    coordinates: list of (cls, mask, rgb, (oy, ox)) and the group's (height, width). Each shape's
    area is drawn in ``object_area`` (fractions of the image), the range's upper part scaled by
    ``area_scale`` (0 = every shape at the minimum). ``twins`` (the class count and the twins'
    hue offset; None = off): each shape is drawn with its twin look (see _twin_look)."""
    lo, hi = object_area
    parts = []
    for cls in classes:
        area = (lo + rng.uniform(0, hi - lo) * area_scale) * size * size
        look, hue = _twin_look(cls, *twins) if twins else (cls, None)
        r = float(np.sqrt(area / _AREA_COEF[look]))
        parts.append((cls, *_shape(cls, rng, r, look if twins else None, hue)))
    if len(parts) == 1:
        cls, m, rgb = parts[0]
        return [(cls, m, rgb, (0, 0))], m.shape
    (mc, mm, mrgb), (rc, rm, rrgb) = parts
    # The rider's lower quarter or so overlaps the mount's top edge (drawn after, so in front).
    overlap = int(round(rng.uniform(0.2, 0.35) * rm.shape[0]))
    shift = int(round(rng.uniform(-0.15, 0.15) * mm.shape[1]))
    rider_x = (mm.shape[1] - rm.shape[1]) // 2 + shift
    x0 = min(0, rider_x)
    placed = [
        (mc, mm, mrgb, (rm.shape[0] - overlap, -x0)),
        (rc, rm, rrgb, (0, rider_x - x0)),
    ]
    height = rm.shape[0] - overlap + mm.shape[0]
    width = max(mm.shape[1], rider_x + rm.shape[1]) - x0
    return placed, (height, width)


def _place(sizes: list[tuple[int, int]], rng: np.random.Generator, size: int, strict: bool):
    """Top-left corners for group boxes inside the image, overlapping each other by at most 15%
    of the smaller box (any overlap allowed when not strict); None if no layout was found."""
    boxes: list[tuple[int, int, int, int]] = []
    for h, w in sizes:
        if h > size - 2 or w > size - 2:
            return None
        for _ in range(60):
            y, x = int(rng.integers(1, size - h)), int(rng.integers(1, size - w))
            if _overlap_ok((y, x, h, w), boxes, strict):
                boxes.append((y, x, h, w))
                break
        else:
            return None
    return boxes


def _context_region(box, rng: np.random.Generator, size: int) -> np.ndarray:
    """A wobbly ellipse around a group box, ~1.5-1.9x its extent: large and surrounding."""
    y, x, h, w = box
    cy, cx = y + h / 2, x + w / 2
    f = rng.uniform(1.5, 1.9)
    ay, ax = h / 2 * f + 3, w / 2 * f + 3
    yy, xx = _grid(size)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.12 * np.sin(rng.integers(2, 5) * angle + rng.uniform(0, 2 * np.pi))
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= wobble**2


def _void_band(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds two labels: a 2 px band on every object boundary."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)


def _partner_spec(k: int, rng: np.random.Generator) -> dict:
    """Shape parameters of a partner region of class k's home texture (on k's side)."""
    return {
        "side": _SIDE[k],
        "depth": rng.uniform(*_PARTNER_DEPTH),
        "along": rng.uniform(*_PARTNER_ALONG),
        "offset": rng.uniform(-0.1, 0.1),
        "lobes": int(rng.integers(2, 5)),
        "phase": rng.uniform(0, 2 * np.pi),
    }


def _partner_box(obj_box, spec: dict) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of the partner region next to ``obj_box`` = (y, x, h, w)."""
    y, x, h, w = obj_box
    if spec["side"] in ("below", "above"):
        depth, along = spec["depth"] * h, spec["along"] * w
        tuck, cx = _PARTNER_TUCK * depth, x + w / 2 + spec["offset"] * w
        y0 = y + h - tuck if spec["side"] == "below" else y + tuck - depth
        return y0, cx - along / 2, y0 + depth, cx + along / 2
    depth, along = spec["depth"] * w, spec["along"] * h
    tuck, cy = _PARTNER_TUCK * depth, y + h / 2 + spec["offset"] * h
    x0 = x + w - tuck if spec["side"] == "right" else x + tuck - depth
    return cy - along / 2, x0, cy + along / 2, x0 + depth


def _partner_region(obj_box, spec: dict, size: int) -> np.ndarray:
    """A wobbly rounded slab / column of ``_partner_box``, clipped to the image."""
    y0, x0, y1, x1 = _partner_box(obj_box, spec)
    cy, cx, ay, ax = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    yy, xx = _grid(size)
    angle = np.arctan2((yy - cy) / ay, (xx - cx) / ax)
    wobble = 1 + 0.08 * np.sin(spec["lobes"] * angle + spec["phase"])
    return ((yy - cy) / ay) ** 4 + ((xx - cx) / ax) ** 4 <= wobble**4


def _overlap_ok(box, boxes, strict: bool) -> bool:
    y, x, h, w = box
    return not strict or all(
        max(0, min(y + h, by + bh) - max(y, by)) * max(0, min(x + w, bx + bw) - max(x, bx))
        <= 0.15 * min(h * w, bh * bw)
        for by, bx, bh, bw in boxes
    )


def _clamp(v: float, u0: float, u1: float, extent: int, size: int) -> int:
    """Group coordinate ``v`` moved so that the unit [v + u0, v + u1) (the group and its partner
    region) lies inside the image; if the unit is too large, just the group [v, v + extent)."""
    lo, hi = int(np.ceil(1 - u0)), int(np.floor(size - 1 - u1))
    if lo > hi:
        lo, hi = 1, size - 1 - extent
    return int(min(max(round(v), lo), hi))


@functools.cache
def _nearby_offsets(size: int) -> tuple[tuple[int, int], ...]:
    """(dy, dx) pixel offsets within ``_NEARBY`` of the image size, nearest first."""
    step, radius = max(1, round(0.02 * size)), _NEARBY * size
    grid = range(-int(radius), int(radius) + 1, step)
    offsets = [(dy, dx) for dy in grid for dx in grid if dy * dy + dx * dx <= radius * radius]
    return tuple(sorted(offsets, key=lambda o: (o[0] ** 2 + o[1] ** 2, o)))


def _group_mask(parts, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _, m, _, (oy, ox) in parts:
        mask[oy : oy + m.shape[0], ox : ox + m.shape[1]] |= m
    return mask


def _place_layout(groups, primaries, homes, specs, shift, rng, size, strict, fallback):
    """Group boxes for the layout confounder and which groups ended up at home; None if no
    layout was found. Home groups go first, at anchor + shift + jitter or the nearest spot where
    the shapes overlap the ones placed by at most 15% of the smaller one (any overlap when not
    strict); the others, and home groups that found no room when ``fallback``, go to a uniform
    random spot with the same rule, as in ``_place``."""
    n = len(groups)
    boxes: list = [None] * n
    at_home = [False] * n
    occupied = np.zeros((size, size), bool)
    smallest = np.inf  # area of the smallest shape placed so far

    def fits(y: int, x: int, mask: np.ndarray) -> bool:
        if not strict or smallest == np.inf:
            return True
        hit = occupied[y : y + mask.shape[0], x : x + mask.shape[1]] & mask
        return hit.sum() <= 0.15 * min(smallest, mask.sum())

    for gi in sorted(range(n), key=lambda g: not homes[g]):
        parts, (gh, gw) = groups[gi]
        if gh > size - 2 or gw > size - 2:
            return None
        gmask = _group_mask(parts, (gh, gw))
        if homes[gi]:
            _, m, _, (oy, ox) = parts[0]  # the primary object (the mount of a pair)
            py0, px0, py1, px1 = _partner_box((oy, ox, *m.shape), specs[gi])
            uy0, ux0, uy1, ux1 = min(0, py0), min(0, px0), max(gh, py1), max(gw, px1)
            centre = (_ANCHOR[primaries[gi]] + shift + rng.uniform(-_JITTER, _JITTER, 2)) * size
            y0, x0 = centre[0] - oy - m.shape[0] / 2, centre[1] - ox - m.shape[1] / 2
            for dy, dx in _nearby_offsets(size):  # the anchor first, then ever further away
                y = _clamp(y0 + dy, uy0, uy1, gh, size)
                x = _clamp(x0 + dx, ux0, ux1, gw, size)
                if fits(y, x, gmask):
                    boxes[gi], at_home[gi] = (y, x, gh, gw), True
                    break
            else:
                if not fallback:
                    return None
        if boxes[gi] is None:
            for _ in range(60):
                y, x = int(rng.integers(1, size - gh)), int(rng.integers(1, size - gw))
                if fits(y, x, gmask):
                    boxes[gi] = (y, x, gh, gw)
                    break
            else:
                return None
        y, x = boxes[gi][:2]
        occupied[y : y + gh, x : x + gw] |= gmask
        smallest = min(smallest, gmask.sum())
    return boxes, at_home


def _draw_classes(rng: np.random.Generator, p_home: float, pair_prob: float, num_classes: int):
    """Primary classes (1..num_classes), their groups (with the rider standing on the mount) and
    contexts (the class whose home each primary object gets: its own, another one, or 0 = none)."""
    n_groups = 1 if rng.random() < 0.6 else 2
    primaries = [int(c) + 1 for c in rng.choice(num_classes, size=n_groups, replace=False)]
    group_classes = [
        [c, _RIDER] if c == _MOUNT and rng.random() < pair_prob else [c] for c in primaries
    ]
    contexts = []
    for c in primaries:
        if rng.random() < p_home:
            contexts.append(c)
        elif rng.random() < 0.5:
            contexts.append(int(rng.choice([k for k in range(1, num_classes + 1) if k != c])))
        else:
            contexts.append(0)  # plain background
    return primaries, group_classes, contexts


def _finish(rng, size, image, context, groups, boxes) -> dict:
    """Draw the objects over the background and regions; noise, quantise, labels, void band."""
    labels = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)
    inst_classes, inst_areas = [], []
    for (parts, _), (by, bx, _, _) in zip(groups, boxes, strict=True):
        for cls, m, rgb, (oy, ox) in parts:
            sl = (slice(by + oy, by + oy + m.shape[0]), slice(bx + ox, bx + ox + m.shape[1]))
            image[sl][m] = rgb[m]
            labels[sl][m] = cls
            inst_classes.append(cls)
            inst_areas.append(float(m.sum()) / (size * size))
            instances[sl][m] = len(inst_classes)

    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    image8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    context[labels > 0] = 0  # context regions are background pixels only
    mask = labels.copy()
    mask[_void_band(labels)] = IGNORE_INDEX
    return {
        "image": image8,
        "mask": mask,
        "context": context,
        "instances": instances,
        "instance_classes": inst_classes,
        "instance_areas": inst_areas,  # full shape (before occlusion), fraction of the image
    }


def _render_texture(
    rng: np.random.Generator, size: int, p_home: float, pair_prob: float, num_classes, area
):
    primaries, group_classes, contexts = _draw_classes(rng, p_home, pair_prob, num_classes)
    # Shrink the objects (never below the minimum area) until they fit without much overlap.
    for attempt in range(12):
        scale = max(0.0, 1.0 - attempt / 8)
        groups = [_group(g, rng, size, scale, area) for g in group_classes]
        boxes = _place([s for _, s in groups], rng, size, strict=attempt < 11)
        if boxes is not None:
            break
    else:  # pragma: no cover - _place with strict=False only fails if a group exceeds the image
        raise RuntimeError(f"cannot lay out {group_classes} in a {size}px image")

    image = _plain_background(rng, size)
    context = np.zeros((size, size), np.uint8)
    for gi in rng.permutation(len(groups)):
        if contexts[gi]:
            region = _context_region(boxes[gi], rng, size)
            image[region] = _context_texture(contexts[gi], rng, size)[region]
            context[region] = contexts[gi]
    sample = _finish(rng, size, image, context, groups, boxes)
    return {
        **sample,
        "primaries": primaries,
        "contexts": contexts,
        "at_home": [False] * len(boxes),
    }, group_classes


def _render_layout(
    rng: np.random.Generator,
    size: int,
    p_home: float,
    pair_prob: float,
    surround: bool,
    num_classes: int,
    area: tuple[float, float],
    twin_hue_offset: float | None = None,
):
    primaries, group_classes, contexts = _draw_classes(rng, p_home, pair_prob, num_classes)
    homes = [k == c for k, c in zip(contexts, primaries, strict=True)]
    specs = [_partner_spec(k, rng) if k else None for k in contexts]
    shift = rng.uniform(-_SHIFT, _SHIFT, 2)  # the image's latent layout
    # Shrink the objects (never below the minimum area) until they fit without much overlap; a
    # home object that still finds no room at home after a few shrinks goes elsewhere, no home.
    twins = None if twin_hue_offset is None else (num_classes, twin_hue_offset)
    for attempt in range(12):
        scale = max(0.0, 1.0 - attempt / 8)
        groups = [_group(g, rng, size, scale, area, twins) for g in group_classes]
        placed = _place_layout(
            groups, primaries, homes, specs, shift, rng, size, attempt < 11, attempt >= 3
        )
        if placed is not None:
            break
    else:  # pragma: no cover - strict=False only fails if a group exceeds the image
        raise RuntimeError(f"cannot lay out {group_classes} in a {size}px image")
    boxes, at_home = placed
    contexts = [0 if h and not a else k for k, h, a in zip(contexts, homes, at_home, strict=True)]

    image = _plain_background(rng, size)
    context = np.zeros((size, size), np.uint8)
    for gi in rng.permutation(len(groups)):
        if contexts[gi]:
            _, m, _, (oy, ox) = groups[gi][0][0]
            by, bx = boxes[gi][:2]
            region = _partner_region((by + oy, bx + ox, *m.shape), specs[gi], size)
            if surround:
                region |= _context_region(boxes[gi], rng, size)
            image[region] = _context_texture(contexts[gi], rng, size)[region]
            context[region] = contexts[gi]
    sample = _finish(rng, size, image, context, groups, boxes)
    return {
        **sample,
        "primaries": primaries,
        "contexts": contexts,
        "at_home": at_home,
    }, group_classes


def render_image(
    rng: np.random.Generator,
    size: int,
    p_home: float,
    pair_prob: float,
    confounder: str = "texture",
    num_classes: int = MIN_CLASSES,
    object_area: tuple[float, float] = _OBJECT_AREA,
    label_ids: tuple[int, ...] | None = None,
) -> dict:
    """One sample: image (uint8 RGB), mask (with 255 band), context regions, instances, and the
    draws behind them (primaries, contexts, at_home: placed at the home anchor, rider).

    ``mask`` and ``context`` hold label values (``label_ids[k - 1]`` for class k, k itself when
    ``label_ids`` is None); ``instance_classes``, ``primaries`` and ``contexts`` class indices
    1..num_classes."""
    if confounder not in CONFOUNDERS:
        raise ValueError(_bad_confounder(confounder))
    num_classes, area, label_ids = _check_options(num_classes, object_area, label_ids, size)
    if confounder == "texture":
        sample, group_classes = _render_texture(rng, size, p_home, pair_prob, num_classes, area)
    else:
        sample, group_classes = _render_layout(
            rng,
            size,
            p_home,
            pair_prob,
            confounder == "both",
            num_classes,
            area,
            twin_hue_offset=_TWIN_HUE_OFFSETS.get(confounder),
        )
    sample["rider"] = any(len(g) == 2 for g in group_classes)
    lut = _label_lut(num_classes, label_ids)
    if lut is not None:  # 0 (background) and 255 (void band) map to themselves
        sample["mask"], sample["context"] = lut[sample["mask"]], lut[sample["context"]]
    return sample


def _bad_confounder(confounder) -> str:
    return (
        f"data.generator.confounder={confounder!r} is unknown; use one of {', '.join(CONFOUNDERS)}"
    )


# -- writing ---------------------------------------------------------------------------------
def _coco_annotations(sample: dict, image_id: int, next_ann_id: int) -> list[dict]:
    anns = []
    for j, cls in enumerate(sample["instance_classes"]):
        visible = np.asfortranarray((sample["instances"] == j + 1).astype(np.uint8))
        rle = mask_utils.encode(visible)
        anns.append(
            {
                "id": next_ann_id + j,
                "image_id": image_id,
                "category_id": ALL_COCO_CATEGORY_IDS[cls - 1],
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(b) for b in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return anns


def _write_split(out: Path, split: str, n: int, args: SynthArgs, p_home: float) -> dict:
    size, n_cls = args.image_size, args.num_classes
    names = ALL_CLASSES[: n_cls + 1]
    ids = [f"{split}_{i:05d}" for i in range(n)]
    images, anns = [], []
    groups = home = at_home = mount = pair = singles = singles_home = 0
    mass = np.zeros((n_cls + 1, 3))  # per class: pixels, sum y, sum x (the class-average mask)
    centroids: list[list[tuple[float, float]]] = [[] for _ in range(n_cls + 1)]  # per image
    areas, visible_areas = [], []  # per object: full shape, visible part; fractions of the image
    yy, xx = _grid(size)
    for i, image_id in enumerate(ids):
        # One stream per (seed, split, index): an image does not depend on the split sizes.
        rng = np.random.default_rng([args.seed, 0 if split == "train" else 1, i])
        s = render_image(
            rng,
            size,
            p_home,
            args.pair_prob,
            args.confounder,
            n_cls,
            args.object_area,
            args.label_ids,
        )
        Image.fromarray(s["image"]).save(out / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (out / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_label_png(s["mask"]))
        (out / "ContextRegions" / f"{image_id}.png").write_bytes(encode_label_png(s["context"]))
        images.append({"id": i + 1, "file_name": f"{image_id}.jpg", "height": size, "width": size})
        anns += _coco_annotations(s, i + 1, len(anns) + 1)
        groups += len(s["primaries"])
        home += sum(c == p for c, p in zip(s["contexts"], s["primaries"], strict=True))
        at_home += sum(s["at_home"])
        for j, cls in enumerate(s["instance_classes"]):
            visible = s["instances"] == j + 1
            n_px = int(visible.sum())
            areas.append(s["instance_areas"][j])
            visible_areas.append(n_px / (size * size))
            mass[cls] += (n_px, yy[visible].sum(), xx[visible].sum())
            if n_px:
                centroids[cls].append((yy[visible].mean(), xx[visible].mean()))
        mount += _MOUNT in s["primaries"]
        pair += s["rider"]
        if len(set(s["instance_classes"])) == 1:
            singles += 1
            singles_home += s["contexts"][0] == s["primaries"][0]
    (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(ALL_COCO_CATEGORY_IDS[:n_cls], names[1:], strict=True)
    ]
    coco = {
        "info": {"description": f"synthetic context-bias set, {split}", "version": SYNTH_VERSION},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    # Realised bias, for the record: P(a primary object's own region is its home context),
    # P(it sits at its home anchor), and where each class's average mask has its mass.
    centre = {
        names[k]: [
            float(mass[k, 1] / mass[k, 0] / size),
            float(mass[k, 2] / mass[k, 0] / size),
        ]
        for k in range(1, n_cls + 1)
        if mass[k, 0]
    }
    spread = {
        names[k]: [float(v) for v in np.std(np.array(centroids[k]) / size, axis=0)]
        for k in range(1, n_cls + 1)
        if len(centroids[k]) > 1
    }
    points = np.array(list(centre.values())).reshape(-1, 2)
    distances = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    return {
        "images": n,
        "home_context_rate": home / max(1, groups),
        "home_layout_rate": at_home / max(1, groups),
        "class_centroid": centre,  # centre of mass of the class-average mask, normalised (y, x)
        "class_centroid_spread": spread,  # std of the per-image class centroid, normalised
        "class_centroid_max_distance": float(distances.max(initial=0.0)),
        "pair_rate": pair / max(1, mount),  # P(rider | mount)
        "single_class_images": singles,
        "single_class_home_rate": singles_home / max(1, singles),
        # Object sizes, fractions of the image: the full shape (before occlusion; drawn in
        # data.generator.object_area, up to pixel rounding) and its visible part.
        "object_area": {
            "mean": float(np.mean(areas)),
            "min": float(np.min(areas)),
            "max": float(np.max(areas)),
        },
        "visible_area_mean": float(np.mean(visible_areas)),
    }


def _expected_files(root: Path, args: SynthArgs) -> list[Path]:
    files = [root / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
    for split, n in (("train", args.num_train), ("val", args.num_val)):
        files.append(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        for i in range(n):
            files += [
                root / "JPEGImages" / f"{split}_{i:05d}.jpg",
                root / "SegmentationClass" / f"{split}_{i:05d}.png",
                root / "ContextRegions" / f"{split}_{i:05d}.png",
            ]
    return files


def _is_complete(root: Path, args: SynthArgs) -> bool:
    meta = read_json_object(root / "meta.json")
    if (
        meta is None
        or meta.get("version") != SYNTH_VERSION
        or meta.get("generator") != _record(args)
    ):
        return False
    return all(p.is_file() for p in _expected_files(root, args))


def _generate(out: Path, args: SynthArgs) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ContextRegions", "annotations"):
        (out / sub).mkdir(parents=True)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True)
    stats = {
        "train": _write_split(out, "train", args.num_train, args, args.p_home),
        "val": _write_split(out, "val", args.num_val, args, args.p_home_val),
    }
    k = args.num_classes
    classes, contexts = ALL_CLASSES[: k + 1], ALL_CONTEXTS[:k]
    meta = {
        "version": SYNTH_VERSION,
        "generator": _record(args),
        # Indexed by the label value written to SegmentationClass / ContextRegions (1..K unless
        # data.generator.label_ids says otherwise; values no class uses are "unused_{id}").
        "classes": _value_names(list(classes), args.label_ids),
        "contexts": _value_names(["none", *contexts], args.label_ids)[1:],
        "home_context": dict(zip(classes[1:], contexts, strict=True)),
        "home_layout": {
            c: {"anchor": list(ALL_HOME_LAYOUT[c][0]), "partner": ALL_HOME_LAYOUT[c][1]}
            for c in classes[1:]
        },
        "pair": PAIR,
        "coco_category_ids": list(ALL_COCO_CATEGORY_IDS[:k]),  # category of class 1..K
        "stats": stats,
    }
    # meta.json last: its presence (with matching args) is what marks the folder complete.
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def ensure_synthetic_voc(
    root: str | os.PathLike,
    *,
    num_train: int = 320,
    num_val: int = 96,
    image_size: int = 96,
    p_home: float = 0.9,
    p_home_val: float = 0.5,
    pair_prob: float = 0.7,
    seed: int = 0,
    confounder: str = "texture",
    num_classes: int = MIN_CLASSES,
    object_area: tuple[float, float] = _OBJECT_AREA,
    label_ids: tuple[int, ...] | None = None,
) -> Path:
    """Generate the synthetic set under ``root`` unless it is already there with these args.

    ``confounder`` (texture | layout | both | twins | twins_same_hue) picks the bias, see the
    module docstring.
    ``num_classes`` (6..12) object classes are drawn, the first of ``ALL_CLASSES``; each object's
    full shape covers ``object_area`` = (min, max) of the image; class k is written as
    ``label_ids[k - 1]`` (default k) in SegmentationClass and ContextRegions. Lists (as Hydra
    passes them) are accepted for both.
    Generation goes to a temp sibling folder that is renamed into place, so an interrupted run
    never leaves a folder that looks complete. An existing non-synthetic folder is never replaced.
    """
    if confounder not in CONFOUNDERS:
        raise ValueError(_bad_confounder(confounder))
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"data.generator needs num_train, num_val >= 1, got {num_train}, {num_val}"
        )
    if image_size < 48:
        raise ValueError(
            f"data.generator.image_size={image_size} is too small for the shapes; use >= 48"
        )
    num_classes, object_area, label_ids = _check_options(
        num_classes, object_area, label_ids, image_size
    )
    args = SynthArgs(
        num_train,
        num_val,
        image_size,
        p_home,
        p_home_val,
        pair_prob,
        seed,
        confounder,
        num_classes,
        object_area,
        label_ids,
    )
    root = Path(root).expanduser().absolute()
    if _is_complete(root, args):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "meta.json").is_file():
        raise DatasetError(
            f"{root} exists and is not a synthetic data set folder (no meta.json), so it will not "
            "be overwritten. Fix: point data.root at an empty or non-existent folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate(tmp, args)
        if _is_complete(root, args):
            return root  # another process (e.g. a second DDP rank) finished it meanwhile
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first (e.g. two DDP ranks); use theirs if it is complete.
            if not _is_complete(root, args):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "generated the synthetic data set (%d train + %d val, %dpx, %s confounder) in %s in %.1fs",
        num_train,
        num_val,
        image_size,
        confounder,
        root,
        time.perf_counter() - start,
    )
    return root
