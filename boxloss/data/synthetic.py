"""An embedded synthetic benchmark for box-supervised segmentation, generated from a seed with numpy.

Why: nothing can be downloaded at run time, yet trainers, demos and end-to-end tests need images with boxes *and*
true masks. A trivially easy set (convex blobs on flat colour) would let "fill the box" look like segmentation, so
the generator copies what makes VOC hard for box supervision:

- irregular, non-convex shapes (solid, lobed, star-armed and ring-like) whose per-class fill rate (mask area / box
  area) spreads over roughly 0.3-0.95, as VOC's does;
- class colours and textures drawn from overlapping distributions, shared with the background;
- cluttered, textured backgrounds with distractors (object-like shapes in mismatched colours, strokes, patches);
- objects of different classes whose boxes overlap, in a random depth order (the smaller is not always in front),
  objects cut by the image border, illumination gradients, blur and noise;
- exact masks with a thin void band (255) on object boundaries, as in VOC, and tight boxes around the visible
  part of each object (VOC's rule).

Every image comes from ``numpy.random.default_rng([seed, split, index])``, so any image can be regenerated on its
own (:func:`generate_sample`) and generation is the same in any order or number of processes. Whole splits are
cached on disk under a key of the parameters (:func:`cache_root`).

Example:
    >>> from boxloss.data import SyntheticConfig, generate_sample
    >>> s = generate_sample(SyntheticConfig(image_size=64), "train", 0)
    >>> s.image.shape, s.mask.shape, s.boxes.shape[1]
    ((64, 64, 3), (64, 64), 4)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage
from torch.utils.data import Dataset

from boxloss.data.sample import VOID, Sample, boxes_from_instances

#: Bumped whenever the images a config produces change, so old caches are not reused.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES = {"train": 2000, "val": 500, "test": 500}
MAX_SYNTHETIC_CLASSES = 20
TEXTURES = ("stripes", "spots", "checker", "grain")


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic benchmark; every field is part of the cache key.

    Args:
        seed: dataset seed; image ``index`` of ``split`` uses ``default_rng([seed, split_number, index])``.
        num_classes: L, 1..20 object classes (class channels 1..L). The class appearance depends only on the class
            number, so classes 1..6 look the same whether L is 6 or 20.
        image_size: ``(H, W)`` or one int for square images.
        mean_objects: mean objects placed per image (geometric, so many images hold one object and a few many, as in
            VOC), before the cap ``max_objects`` and before hidden objects are removed.
        max_objects: cap on objects placed per image (at most 250).
        void_band: void (255) covers pixels within this many pixels (Chebyshev) of a boundary between two objects or
            an object and background; 0 disables it. 1 gives a 2-pixel band, about VOC's 5-pixel band at 256 pixels.
        overlap_prob: probability that an object is placed overlapping an earlier one of another class.
        border_prob: probability that an object is placed across the image border.
        distractors: maximum number of distractor shapes per image (0 disables them).
        noise: maximum standard deviation of the additive Gaussian noise, in [0, 1] colour units.
        blur: maximum Gaussian blur sigma in pixels.
        class_ids: the class channels objects are drawn from (default ``None``: all of 1..L). A subset gives
            class-disjoint datasets, e.g. for pre-training on classes a segmentation benchmark does not use, or LPG's
            auxiliary and target sets; label values stay the class channels.

    Example:
        >>> from boxloss.data import SyntheticConfig
        >>> SyntheticConfig(image_size=128, num_classes=10).image_size
        (128, 128)
    """

    seed: int = 0
    num_classes: int = 6
    image_size: tuple[int, int] | int = (256, 256)
    mean_objects: float = 2.6
    max_objects: int = 8
    void_band: int = 1
    overlap_prob: float = 0.35
    border_prob: float = 0.15
    distractors: int = 3
    noise: float = 0.04
    blur: float = 1.0
    class_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
            raise ValueError(f"SyntheticConfig: image_size must be an int or (H, W) ints, got {self.image_size!r}")
        size = (int(size[0]), int(size[1]))
        if min(size) < 16 or max(size) > 4096:
            raise ValueError(f"SyntheticConfig: image_size must be between 16 and 4096 pixels, got {size}")
        object.__setattr__(self, "image_size", size)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("num_classes", self.num_classes, 1, MAX_SYNTHETIC_CLASSES)
        _check_int("max_objects", self.max_objects, 1, 250)
        _check_int("void_band", self.void_band, 0, 16)
        _check_int("distractors", self.distractors, 0, 32)
        _check_float("mean_objects", self.mean_objects, 1.0, float(self.max_objects))
        for name in ("overlap_prob", "border_prob"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_float("noise", self.noise, 0.0, 0.5)
        _check_float("blur", self.blur, 0.0, 10.0)
        if self.class_ids is not None:
            ids = tuple(self.class_ids) if isinstance(self.class_ids, (tuple, list)) else None
            if not ids or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in ids) \
                    or len(set(ids)) != len(ids) or not all(1 <= v <= self.num_classes for v in ids):
                raise ValueError(f"SyntheticConfig: class_ids must be distinct class channels in 1..{self.num_classes}"
                                 f", got {self.class_ids!r}")
            object.__setattr__(self, "class_ids", tuple(sorted(int(v) for v in ids)))

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]

    @property
    def class_names(self) -> list[str]:
        return synthetic_class_names(self.num_classes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        if self.class_ids is None:  # absent from the key, so configs without a subset keep their cache
            del d["class_ids"]
        else:
            d["class_ids"] = list(self.class_ids)
        return d

    def key(self) -> str:
        """16 hex digits of a hash of the parameters and :data:`GENERATOR_VERSION` (the cache folder name)."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"SyntheticConfig: {name} must be an int in [{lo}, {hi}], got {value!r}")


def _check_float(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not (lo <= float(value) <= hi):
        raise ValueError(f"SyntheticConfig: {name} must be a number in [{lo}, {hi}], got {value!r}")


def synthetic_class_names(num_classes: int) -> list[str]:
    """``["syn01", ..., "synL"]``: the class names used in VOC and COCO exports of the benchmark."""
    return [f"syn{k:02d}" for k in range(1, num_classes + 1)]


# ----------------------------------------------------------------------------------------------------------------
# Classes: a fixed recipe per class number, with a shape family calibrated to a target fill rate.


@dataclass(frozen=True)
class ClassRecipe:
    """How objects of one class look. ``fill_target`` is the mean fill rate of the bare shape in its tight box (the
    measured rate is a little lower: the void band and occlusion remove pixels)."""

    name: str
    fill_target: float
    style: str
    looseness: float
    aspect: float
    rotation: float
    size: float
    hue: float
    texture: str
    frequency: float


def _spread(k: int) -> float:
    """1, 0, then the base-2 van der Corput sequence (1/2, 1/4, 3/4, 1/8, ...): the first L classes spread over
    [0, 1] for any L."""
    if k < 2:
        return 1.0 - k
    n, denom, out = k - 1, 2.0, 0.0
    while n:
        out += (n & 1) / denom
        n >>= 1
        denom *= 2
    return out


FILL_RANGE = (0.33, 0.99)  # targets of the bare shapes; void and occlusion bring the measured rates to ~0.3-0.95


@functools.lru_cache(maxsize=None)
def class_recipe(k: int) -> ClassRecipe:
    """The recipe of class channel ``k + 1`` (``k`` in 0..19), calibrated once per process."""
    if not 0 <= k < MAX_SYNTHETIC_CLASSES:
        raise ValueError(f"class_recipe: class index must be in [0, {MAX_SYNTHETIC_CLASSES}), got {k}")
    rng = np.random.default_rng([7919, k])
    target = FILL_RANGE[0] + (FILL_RANGE[1] - FILL_RANGE[0]) * _spread(k)
    if target >= 0.78:
        style, rotation = "solid", 0.15
    elif target >= 0.56:
        style, rotation = "lobed", np.pi
    else:
        style, rotation = ("star", "ring")[(k // 2) % 2], np.pi
    aspect = float(rng.uniform(1.0, 1.7))
    recipe = ClassRecipe(
        name=f"syn{k + 1:02d}", fill_target=float(target), style=style, looseness=0.0, aspect=aspect,
        rotation=float(rotation), size=float(rng.uniform(0.3, 0.5)), hue=float((k * 0.618034) % 1.0),
        texture=TEXTURES[k % len(TEXTURES)], frequency=float(2.0 + (k * 1.37) % 4.0),
    )
    return dataclasses.replace(recipe, looseness=_calibrate(recipe))


def _calibrate(recipe: ClassRecipe) -> float:
    """The looseness in [0, 1] whose mean bare-shape fill rate is nearest ``fill_target`` (fill falls as looseness
    rises), by interpolation on a grid measured with a fixed generator."""
    grid = np.linspace(0.0, 1.0, 9)
    fills = []
    for lam in grid:
        rng = np.random.default_rng(12345)
        vals = []
        for _ in range(24):
            m = _shape_mask(rng, dataclasses.replace(recipe, looseness=float(lam)), 48)
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if rows.size:
                vals.append(m.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
        fills.append(np.mean(vals))
    fills = np.minimum.accumulate(np.asarray(fills))  # make it monotone for interpolation
    t = recipe.fill_target
    if t >= fills[0]:
        return 0.0
    if t <= fills[-1]:
        return 1.0
    # np.interp needs increasing x: interpolate looseness over reversed fill
    return float(np.interp(t, fills[::-1], grid[::-1]))


def _shape_mask(rng: np.random.Generator, recipe: ClassRecipe, d: int) -> np.ndarray:
    """A (d, d) bool shape of the recipe's family: a superellipse in polar form, modulated by arms/lobes, optionally
    with a hole, with random low-order boundary irregularity, rotated and stretched."""
    lam = recipe.looseness
    c = (np.arange(d, dtype=np.float32) + 0.5) * (2.0 / d) - 1.0
    rotation = recipe.rotation * lam if recipe.style == "solid" else recipe.rotation  # the fullest shapes stand upright
    a = rng.uniform(-rotation, rotation)
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    aspect = np.float32(recipe.aspect * np.exp(rng.normal(0.0, 0.15)))
    u = ca * c[None, :] + sa * c[:, None]
    v = (ca * c[:, None] - sa * c[None, :]) * aspect
    th = np.arctan2(v, u)
    irr_scale = {"solid": 0.15 * lam, "lobed": 1.0, "star": 1.0, "ring": 1.0}[recipe.style]
    irr = np.zeros(d * d, np.float32).reshape(d, d)
    for k in range(3, 8):
        amp = rng.normal(0.0, 0.12 / k) * irr_scale
        irr += np.float32(amp) * np.cos(k * th + np.float32(rng.uniform(0, 2 * np.pi)))
    p, amp_arms, hole, m, q = 2.0, 0.0, 0.0, 3, 1.0
    if recipe.style == "solid":
        p = 2.0 + 10.0 * (1.0 - lam) ** 2
    elif recipe.style == "lobed":
        m, amp_arms = int(rng.integers(2, 5)), 0.65 * lam
    elif recipe.style == "star":
        m, amp_arms, q = int(rng.integers(4, 7)), 0.35 + 0.55 * lam, 0.35
    else:
        hole = 0.2 + 0.6 * lam
    if p == 2.0:
        rho = np.sqrt(u * u + v * v)
    else:
        rho = (np.abs(u) ** p + np.abs(v) ** p) ** np.float32(1.0 / p)
    r = np.float32(0.97) * (1.0 + irr)
    if amp_arms:
        arms = (1.0 - np.cos(m * th + np.float32(rng.uniform(0, 2 * np.pi)))) * np.float32(0.5)
        if q != 1.0:
            arms = arms ** np.float32(q)
        r = r * (1.0 - np.float32(amp_arms) * arms)
    inside = rho < r
    if hole:
        inside &= rho > np.float32(hole) * r
    return inside


# ----------------------------------------------------------------------------------------------------------------
# Rendering.


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    h = np.asarray(h, np.float64) % 1.0
    s = np.clip(s, 0, 1)
    v = np.clip(v, 0, 1)
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(x, -1) for x in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, np.broadcast_to(i, np.shape(h))[None, ..., None], 0)[0].astype(np.float32)


def _class_colours(rng, recipe: ClassRecipe) -> tuple[np.ndarray, np.ndarray]:
    h = recipe.hue + rng.normal(0, 0.06)
    c1 = _hsv_to_rgb(h, rng.uniform(0.35, 0.95), rng.uniform(0.35, 0.95))
    c2 = _hsv_to_rgb(h + rng.uniform(-0.12, 0.12), rng.uniform(0.2, 0.9), rng.uniform(0.1, 0.9))
    return c1, c2


def _random_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    h = rng.random()
    return (_hsv_to_rgb(h, rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95)),
            _hsv_to_rgb(h + rng.uniform(-0.3, 0.3), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95)))


def _smooth_noise(rng, h: int, w: int, cells_y: int, cells_x: int, channels: int = 0) -> np.ndarray:
    """Bilinear upsampling of a random (cells + 2) grid to (h, w[, channels]) values in [0, 1]."""
    shape = (cells_y + 2, cells_x + 2) + ((channels,) if channels else ())
    grid = rng.random(shape, dtype=np.float32)
    gy = (np.arange(h, dtype=np.float32) + 0.5) * (cells_y / h) + 0.5
    gx = (np.arange(w, dtype=np.float32) + 0.5) * (cells_x / w) + 0.5
    iy, ix = gy.astype(np.int64), gx.astype(np.int64)
    fy, fx = gy - iy, gx - ix
    if channels:
        fy, fx = fy[:, None, None], fx[None, :, None]
    else:
        fy, fx = fy[:, None], fx[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture(rng, kind: str, frequency: float, h: int, w: int, scale: float) -> np.ndarray:
    """A (h, w) pattern in [0, 1]; ``frequency`` is in cycles per ``scale`` pixels."""
    f = max(frequency, 0.5) / max(scale, 1.0)
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        y = np.arange(h, dtype=np.float32)[:, None]
        x = np.arange(w, dtype=np.float32)[None, :]
        ph = np.float32(2 * np.pi * f) * (x * np.float32(np.cos(a)) + y * np.float32(np.sin(a)))
        return np.sin(ph + np.float32(rng.uniform(0, 2 * np.pi))) * np.float32(0.5) + np.float32(0.5)
    if kind == "spots":
        cy, cx = max(1, int(h * f * 1.5)), max(1, int(w * f * 1.5))
        n = _smooth_noise(rng, h, w, cy, cx)
        return np.clip((n - np.float32(0.5)) * np.float32(3.0) + np.float32(0.5), 0, 1)
    if kind == "checker":
        period = max(2.0, 1.0 / f)
        oy, ox = rng.uniform(0, period, 2)
        y = ((np.arange(h) + oy) // (period / 2)).astype(np.int64)[:, None]
        x = ((np.arange(w) + ox) // (period / 2)).astype(np.int64)[None, :]
        return ((y + x) % 2).astype(np.float32)
    cells = max(1, int(min(h, w) * f * 4))
    return _smooth_noise(rng, h, w, max(1, h * cells // max(min(h, w), 1)), max(1, w * cells // max(min(h, w), 1)))


def _paint(rng, out: np.ndarray, region: np.ndarray, sl, c1, c2, kind: str, frequency: float, scale: float,
           contrast: float = 1.0) -> None:
    """Fill ``out[sl][region]`` with a shaded two-colour texture."""
    h, w = region.shape
    pat = _texture(rng, kind, frequency, h, w, scale) * np.float32(contrast)
    ramp = np.linspace(-0.5, 0.5, max(h, w), dtype=np.float32)
    shade = 1.0 + np.float32(rng.uniform(-0.4, 0.4)) * (ramp[:h, None] if rng.random() < 0.5 else ramp[None, :w])
    col = (c1 + (c2 - c1) * pat[..., None]) * shade[..., None]
    target = out[sl]
    target[region] = col[region]


def _place(rng, d: int, H: int, W: int, border: bool) -> tuple[int, int]:
    """Top-left corner of a d x d canvas: anywhere, or across a random image border."""
    y = int(rng.integers(-d // 10, max(H - 9 * d // 10, -d // 10 + 1)))
    x = int(rng.integers(-d // 10, max(W - 9 * d // 10, -d // 10 + 1)))
    if border:
        side = int(rng.integers(4))
        cut = int(rng.uniform(0.15, 0.45) * d)
        if side == 0:
            y = -cut
        elif side == 1:
            y = H - d + cut
        elif side == 2:
            x = -cut
        else:
            x = W - d + cut
    return y, x


def _clip(y: int, x: int, d: int, H: int, W: int):
    """Image slices and canvas slices of a d x d canvas at (y, x); None if it misses the image."""
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + d, H), min(x + d, W)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def _void(instances: np.ndarray, band: int) -> np.ndarray:
    if band <= 0:
        return np.zeros(instances.shape, bool)
    size = 2 * band + 1
    return ndimage.maximum_filter(instances, size=size, mode="nearest") != ndimage.minimum_filter(
        instances, size=size, mode="nearest")


def _render(config: SyntheticConfig, rng: np.random.Generator, details: dict | None = None):
    """(image (H, W, 3) uint8, instances (H, W) uint8, labels (K,) int64) of one scene; ``details`` (a dict), if
    given, receives ``full_masks`` (K, H, W) bool (each object's whole shape inside the image) and ``depth`` (K,)."""
    H, W = config.image_size
    S = float(np.sqrt(H * W))
    L = config.num_classes
    pool = [k - 1 for k in config.class_ids] if config.class_ids is not None else list(range(L))
    recipes = {k: class_recipe(k) for k in pool}
    min_pixels = max(12, int(0.0015 * H * W))

    # --- geometry: objects, depth order, visibility -------------------------------------------------------------
    n = int(min(config.max_objects, rng.geometric(1.0 / config.mean_objects)))
    objects = []  # dicts: cls, mask (d x d), y, x
    for i in range(n):
        overlap = bool(objects) and rng.random() < config.overlap_prob
        if overlap:
            other = objects[int(rng.integers(len(objects)))]
            choices = [c for c in pool if c != other["cls"]] or [other["cls"]]
            cls = int(choices[int(rng.integers(len(choices)))])
        else:
            cls = pool[int(rng.integers(len(pool)))]
        rec = recipes[cls]
        d = int(np.clip(S * rec.size * np.exp(rng.normal(0, 0.3)), 10, 0.95 * min(H, W)))
        mask = _shape_mask(rng, rec, d)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        shape_box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)  # the shape's tight box inside its canvas
        if overlap:  # the two shapes' boxes overlap: centres closer than 3/4 of the summed half sizes
            (oy0, ox0, oy1, ox1), (sy0, sx0, sy1, sx1) = other["box"], shape_box
            cy = (oy0 + oy1) / 2 + rng.uniform(-0.75, 0.75) * ((oy1 - oy0) + (sy1 - sy0)) / 2
            cx = (ox0 + ox1) / 2 + rng.uniform(-0.75, 0.75) * ((ox1 - ox0) + (sx1 - sx0)) / 2
            y, x = int(round(cy - (sy0 + sy1) / 2)), int(round(cx - (sx0 + sx1) / 2))
        else:
            y, x = _place(rng, d, H, W, rng.random() < config.border_prob)
        if _clip(y, x, d, H, W) is not None:
            box = (y + shape_box[0], x + shape_box[1], y + shape_box[2], x + shape_box[3])
            objects.append({"cls": cls, "mask": mask, "y": y, "x": x, "box": box})
    order = list(rng.permutation(len(objects)))  # back to front: the smaller object is not always in front

    def instance_map(order):
        inst = np.zeros((H, W), np.uint8)
        for z in order:
            o = objects[z]
            img_sl, can_sl = _clip(o["y"], o["x"], o["mask"].shape[0], H, W)
            inst[img_sl][o["mask"][can_sl]] = z + 1
        return inst

    for attempt in range(4):
        inst = instance_map(order)
        visible = np.bincount(inst.ravel(), minlength=len(objects) + 1)[1:]
        core = np.bincount(inst[~_void(inst, config.void_band)].ravel(), minlength=len(objects) + 1)[1:]
        full = np.array([o["mask"][_clip(o["y"], o["x"], o["mask"].shape[0], H, W)[1]].sum() for o in objects])
        weak = [z for z in order if visible[z] < max(min_pixels, 0.25 * full[z]) or core[z] < min_pixels // 2]
        if not weak:
            break
        if attempt == 0:  # bring badly hidden objects to the front once, then drop what is still too small
            order = [z for z in order if z not in weak] + weak
        else:
            order = [z for z in order if z not in weak]
    else:
        order = []
    inst = instance_map(order)
    # renumber the kept objects 1..K in order of creation
    kept = sorted(order)
    lut = np.zeros(len(objects) + 1, np.uint8)
    lut[[z + 1 for z in kept]] = np.arange(1, len(kept) + 1)
    inst = lut[inst]
    labels = np.array([objects[z]["cls"] + 1 for z in kept], np.int64)
    if details is not None:
        full = np.zeros((len(kept), H, W), bool)
        for k, z in enumerate(kept):
            o = objects[z]
            img_sl, can_sl = _clip(o["y"], o["x"], o["mask"].shape[0], H, W)
            full[k][img_sl] = o["mask"][can_sl]
        details["full_masks"] = full
        details["depth"] = np.array([order.index(z) for z in kept], np.int64)

    # --- appearance ---------------------------------------------------------------------------------------------
    ca, cb = _random_colours(rng)
    img = ca + (cb - ca) * _smooth_noise(rng, H, W, int(rng.integers(1, 4)), int(rng.integers(1, 4)))[..., None]
    img += (_smooth_noise(rng, H, W, int(rng.integers(3, 7)), int(rng.integers(3, 7)), channels=3)
            - np.float32(0.5)) * np.float32(0.25)
    img = np.ascontiguousarray(img, np.float32)
    yy = np.arange(H, dtype=np.float32)[:, None] - np.float32(H / 2)
    xx = np.arange(W, dtype=np.float32)[None, :] - np.float32(W / 2)
    for _ in range(int(rng.integers(1, 4))):  # large textured regions (wall, floor, table), often in class colours
        a = rng.uniform(0, 2 * np.pi)
        proj = xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a))
        t = rng.uniform(-0.4, 0.4) * S
        region = proj > t if rng.random() < 0.5 else np.abs(proj - t) < rng.uniform(0.05, 0.2) * S
        c1, c2 = _class_colours(rng, recipes[pool[int(rng.integers(len(pool)))]]) if rng.random() < 0.5 else _random_colours(rng)
        _paint(rng, img, region, (slice(0, H), slice(0, W)), c1, c2, TEXTURES[int(rng.integers(len(TEXTURES)))],
               rng.uniform(2.0, 8.0), S * 0.4, contrast=rng.uniform(0.2, 1.0))
    for _ in range(int(rng.integers(0, config.distractors + 1))):  # object-like shapes in mismatched colours
        shape_cls, colour_cls = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
        if len(pool) > 1:
            while colour_cls == shape_cls:
                colour_cls = pool[int(rng.integers(len(pool)))]
        d = int(np.clip(S * rng.uniform(0.1, 0.35), 6, 0.9 * min(H, W)))
        kind = rng.random()
        if kind < 0.35:  # a thick stroke
            m = np.zeros((d, d), bool)
            t = max(1, d // int(rng.integers(6, 14)))
            m[d // 2 - t: d // 2 + t] = True
            if rng.random() < 0.5:
                m = m.T
        elif kind < 0.65:  # an ellipse
            ellipse = ClassRecipe(name="", fill_target=0.8, style="lobed", looseness=0.0, aspect=1.0 + rng.random(),
                                  rotation=np.pi, size=0.0, hue=0.0, texture="", frequency=0.0)
            m = _shape_mask(rng, ellipse, d)
        else:
            m = _shape_mask(rng, recipes[shape_cls], d)
        y, x = _place(rng, d, H, W, False)
        sl = _clip(y, x, d, H, W)
        if sl is None:
            continue
        crec = recipes[colour_cls]
        c1, c2 = _class_colours(rng, crec)
        _paint(rng, img, m[sl[1]], sl[0], c1, c2, crec.texture, crec.frequency, d)
    for z in kept:  # objects, back to front, only where they are visible
        o = objects[z]
        rec = recipes[o["cls"]]
        img_sl, can_sl = _clip(o["y"], o["x"], o["mask"].shape[0], H, W)
        region = inst[img_sl] == lut[z + 1]
        if not region.any():
            continue
        kind = rec.texture if rng.random() < 0.7 else TEXTURES[int(rng.integers(len(TEXTURES)))]
        freq = rec.frequency * float(np.exp(rng.normal(0, 0.3)))
        c1, c2 = _class_colours(rng, rec)
        _paint(rng, img, region, img_sl, c1, c2, kind, freq, o["mask"].shape[0])

    # --- illumination, blur, noise -------------------------------------------------------------------------------
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * (np.arange(W, dtype=np.float32)[None, :] / W - 0.5)
            + np.sin(a) * (np.arange(H, dtype=np.float32)[:, None] / H - 0.5))
    img *= (np.float32(1.0) + np.float32(rng.uniform(0.1, 0.5)) * ramp.astype(np.float32))[..., None]
    sigma = rng.uniform(0.0, config.blur)
    if sigma > 0.2:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    noise = rng.uniform(0.0, config.noise)
    if noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    image = (np.clip(img, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
    return image, inst, labels


def _rng(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"synthetic: split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"synthetic: index must be an int >= 0, got {index!r}")
    return np.random.default_rng([config.seed, SPLITS.index(split), int(index)])


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def sample_from_instances(image: np.ndarray, instances: np.ndarray, labels: np.ndarray, void_band: int,
                          image_id: str, boxes: np.ndarray | None = None) -> Sample:
    """Build a :class:`Sample` from an instance map: the mask is each instance's class with void where a
    (2 void_band + 1)-square window holds two different instances (or an instance and background)."""
    labels = np.asarray(labels, np.int64)
    lut = np.zeros(256, np.uint8)
    lut[1: len(labels) + 1] = labels
    mask = lut[instances]
    mask[_void(instances, void_band)] = VOID
    if boxes is None:
        boxes = boxes_from_instances(instances, len(labels))
    return Sample(image=image, boxes=np.asarray(boxes, np.float32), labels=labels, mask=mask, image_id=image_id,
                  instances=instances.astype(np.int32))


def generate_sample(config: SyntheticConfig, split: str, index: int) -> Sample:
    """Generate image ``index`` of ``split`` on its own (identical to item ``index`` of the cached dataset).

    Example:
        >>> from boxloss.data import SyntheticConfig, generate_sample
        >>> a = generate_sample(SyntheticConfig(image_size=48, seed=3), "val", 5)
        >>> b = generate_sample(SyntheticConfig(image_size=48, seed=3), "val", 5)
        >>> bool((a.image == b.image).all() and (a.mask == b.mask).all())
        True
    """
    image, inst, labels = _render(config, _rng(config, split, index))
    return sample_from_instances(image, inst, labels, config.void_band, image_id(split, index))


@dataclass
class SceneLayout:
    """A generated sample with what occlusion hid: ``full_masks`` (K, H, W) bool is each object's whole shape inside
    the image, ``depth`` (K,) its rank back to front (0 is at the back). Why: to check occlusion and depth order."""

    sample: Sample
    full_masks: np.ndarray
    depth: np.ndarray


def generate_scene(config: SyntheticConfig, split: str, index: int) -> SceneLayout:
    """:func:`generate_sample` plus the scene layout (the same sample: the layout is recorded, not re-drawn)."""
    details: dict = {}
    image, inst, labels = _render(config, _rng(config, split, index), details)
    sample = sample_from_instances(image, inst, labels, config.void_band, image_id(split, index))
    return SceneLayout(sample, details["full_masks"], details["depth"])


def _generate_chunk(config: SyntheticConfig, split: str, start: int, stop: int):
    H, W = config.image_size
    images = np.empty((stop - start, H, W, 3), np.uint8)
    instances = np.empty((stop - start, H, W), np.uint8)
    boxes, labels, counts = [], [], []
    for i in range(start, stop):
        img, inst, lab = _render(config, _rng(config, split, i))
        images[i - start], instances[i - start] = img, inst
        boxes.append(boxes_from_instances(inst, len(lab)))
        labels.append(lab)
        counts.append(len(lab))
    return start, images, instances, np.concatenate(boxes), np.concatenate(labels), np.asarray(counts, np.int64)


@dataclass
class SyntheticArrays:
    """A generated split: ``images`` (N, H, W, 3) uint8, ``instances`` (N, H, W) uint8 (0 background, k + 1 for box k
    of that image), ``boxes`` (K, 4) float32 and ``labels`` (K,) int64 of all images, and ``offsets`` (N + 1,) int64:
    image i owns boxes ``offsets[i]:offsets[i + 1]``. Arrays may be read-only memory maps of the cache."""

    images: np.ndarray
    instances: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int) -> "SyntheticArrays":
        k = int(self.offsets[n])
        return SyntheticArrays(self.images[:n], self.instances[:n], self.boxes[:k], self.labels[:k],
                               self.offsets[: n + 1])


def default_workers(n: int) -> int:
    return 1 if n < 64 else max(1, min(os.cpu_count() or 1, 8))


def generate_split(config: SyntheticConfig, split: str, num_images: int, *, workers: int | None = None,
                   out: tuple[np.ndarray, np.ndarray] | None = None) -> SyntheticArrays:
    """Generate images 0..num_images-1 of ``split`` (in ``workers`` processes; the result does not depend on it).

    ``out`` may give preallocated ``(images, instances)`` arrays (e.g. memory maps) to write into.
    """
    _check_int("num_images", num_images, 0, 10**8)
    for k in range(config.num_classes):  # calibrate in the parent so forked workers inherit it
        class_recipe(k)
    H, W = config.image_size
    images, instances = out if out is not None else (np.empty((num_images, H, W, 3), np.uint8),
                                                     np.empty((num_images, H, W), np.uint8))
    workers = default_workers(num_images) if workers is None else int(workers)
    chunk = max(1, min(64, -(-num_images // max(workers * 4, 1))))
    bounds = [(s, min(s + chunk, num_images)) for s in range(0, num_images, chunk)]
    parts = {}

    def take(result):
        start, im, ins, b, lab, cnt = result
        images[start: start + len(im)] = im
        instances[start: start + len(im)] = ins
        parts[start] = (b, lab, cnt)

    if workers <= 1 or len(bounds) <= 1:
        for s, e in bounds:
            take(_generate_chunk(config, split, s, e))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_generate_chunk, *zip(*[(config, split, s, e) for s, e in bounds])):
                take(result)
    keys = sorted(parts)
    boxes = np.concatenate([parts[k][0] for k in keys]) if keys else np.zeros((0, 4), np.float32)
    labels = np.concatenate([parts[k][1] for k in keys]) if keys else np.zeros((0,), np.int64)
    counts = np.concatenate([parts[k][2] for k in keys]) if keys else np.zeros((0,), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SyntheticArrays(images, instances, boxes.astype(np.float32), labels.astype(np.int64), offsets)


# ----------------------------------------------------------------------------------------------------------------
# Cache.

CACHE_ENV = "BOXLOSS_DATA_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cached datasets live: ``cache_dir``, else ``$BOXLOSS_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/boxloss/synthetic`` (``~/.cache/boxloss/synthetic``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "boxloss" / "synthetic"


def cache_path(config: SyntheticConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``config``'s cached splits: ``cache_root(cache_dir) / config.key()``."""
    return cache_root(cache_dir) / config.key()


def _split_files(folder: Path, split: str, n: int) -> dict[str, Path]:
    stem = f"{split}-{n}"
    return {"images": folder / f"{stem}.images.npy", "instances": folder / f"{stem}.instances.npy",
            "boxes": folder / f"{stem}.boxes.npz"}


def _cached_sizes(folder: Path, split: str) -> list[int]:
    sizes = []
    for p in folder.glob(f"{split}-*.boxes.npz"):
        try:
            sizes.append(int(p.name[len(split) + 1: -len(".boxes.npz")]))
        except ValueError:
            continue
    return sorted(sizes)


def _cached_sizes_at_least(folder: Path, split: str, n: int) -> int:
    for m in _cached_sizes(folder, split):
        if m >= n:
            return m
    raise FileNotFoundError(f"synthetic cache {folder} no longer holds {n} {split} images")


def _load_cached(config: SyntheticConfig, files: dict[str, Path], n: int) -> SyntheticArrays:
    H, W = config.image_size
    with np.load(files["boxes"]) as z:
        boxes, labels, offsets = z["boxes"], z["labels"], z["offsets"]
    images = np.load(files["images"], mmap_mode="r")
    instances = np.load(files["instances"], mmap_mode="r")
    if images.shape[1:] != (H, W, 3) or instances.shape != images.shape[:3] or offsets.shape != (len(images) + 1,) \
            or len(images) < n or boxes.shape != (offsets[-1], 4) or labels.shape != (offsets[-1],):
        raise ValueError("arrays do not match each other or the config")
    return SyntheticArrays(images, instances, boxes, labels, offsets).head(n)


def load_or_generate(config: SyntheticConfig, split: str, num_images: int, *,
                     cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                     log: Callable[[str], None] | None = None) -> tuple[SyntheticArrays, Path]:
    """The first ``num_images`` of ``split``, from the cache if any cached run of at least that many exists,
    else generated and written there (atomically: files are renamed into place, so an interrupted or concurrent
    run never leaves a half-written split that looks complete). Returns the arrays and the cache folder."""
    _rng(config, split, 0)  # validates split
    folder = cache_path(config, cache_dir)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(
                    f"synthetic cache: {p} is a file, so the cache folder {folder} cannot be made there; give "
                    "cache_dir (--cache-dir) a folder, or cache=False (--no-cache) to write no cache"
                )
            break
    for m in _cached_sizes(folder, split) if folder.is_dir() else []:
        if m >= num_images:
            files = _split_files(folder, split, m)
            try:
                return _load_cached(config, files, num_images), folder
            except Exception as e:  # noqa: BLE001 -- any unreadable cache is regenerated, loudly
                warnings.warn(f"synthetic cache {files['boxes']} is unreadable ({e}); regenerating it")
                for p in files.values():
                    p.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.json"
    if not params.exists():
        _atomic_write_text(params, json.dumps({"generator_version": GENERATOR_VERSION, **config.to_dict()},
                                              indent=1, sort_keys=True))
    if log:
        log(f"generating {num_images} {split} images into {folder}")
    files = _split_files(folder, split, num_images)
    H, W = config.image_size
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in files.items()}
    try:
        images = np.lib.format.open_memmap(tmp["images"], mode="w+", dtype=np.uint8, shape=(num_images, H, W, 3))
        instances = np.lib.format.open_memmap(tmp["instances"], mode="w+", dtype=np.uint8,
                                              shape=(num_images, H, W))
        arrays = generate_split(config, split, num_images, workers=workers, out=(images, instances))
        images.flush()
        instances.flush()
        with open(tmp["boxes"], "wb") as f:
            np.savez(f, boxes=arrays.boxes, labels=arrays.labels, offsets=arrays.offsets)
        del images, instances, arrays
        # the boxes file marks a split complete, so it goes into place last
        for k in ("images", "instances", "boxes"):
            os.replace(tmp[k], files[k])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return _load_cached(config, files, num_images), folder


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Dataset.


class SyntheticBoxDataset(Dataset):
    """A split of the synthetic benchmark as :class:`~boxloss.data.Sample` items.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_images: images in the split (default 2,000 / 500 / 500). Item i is image i of the split for any
            ``num_images``, so a smaller dataset is a prefix of a larger one (and is served from its cache).
        config: the :class:`SyntheticConfig` (default: 6 classes, 256 x 256, seed 0).
        cache_dir: root of the on-disk cache (default ``$BOXLOSS_DATA_CACHE`` or ``~/.cache/boxloss/synthetic``); the
            split lives in ``<root>/<config.key()>/``.
        cache: ``False`` generates into memory and writes nothing.
        workers: generation processes (default: up to 8 for 64 images or more, else 1). Results do not depend on it.
        transform: called as ``transform(sample)`` on each item.

    Each item has ``image`` (H, W, 3) uint8, ``boxes`` (K, 4) float32 tight around the visible object,
    ``labels`` (K,) int64 in 1..L, ``mask`` (H, W) uint8 (0 background, 1..L, 255 void band), ``instances`` (H, W)
    int32 (k + 1 on box k's visible pixels) and ``image_id`` ``"<split>_<index:06d>"``.

    Example:
        >>> from boxloss.data import SyntheticBoxDataset, SyntheticConfig, collate_samples
        >>> ds = SyntheticBoxDataset("train", 4, SyntheticConfig(image_size=64), cache=False)
        >>> batch = collate_samples([ds[0], ds[1]])
        >>> tuple(batch.images.shape)
        (2, 3, 64, 64)
    """

    def __init__(self, split: str = "train", num_images: int | None = None, config: SyntheticConfig | None = None,
                 *, cache_dir: str | os.PathLike | None = None, cache: bool = True, workers: int | None = None,
                 transform: Callable[[Sample], Sample] | None = None, log: Callable[[str], None] | None = None):
        self.config = config if config is not None else SyntheticConfig()
        if not isinstance(self.config, SyntheticConfig):
            raise TypeError(f"SyntheticBoxDataset: config must be a SyntheticConfig, got {type(config).__name__}")
        _rng(self.config, split, 0)
        self.split = split
        n = DEFAULT_SPLIT_SIZES[split] if num_images is None else num_images
        _check_int("num_images", n, 0, 10**8)
        if cache:
            self.arrays, self.cache_path = load_or_generate(self.config, split, n, cache_dir=cache_dir,
                                                            workers=workers, log=log)
        else:
            self.arrays, self.cache_path = generate_split(self.config, split, n, workers=workers), None
        self.num_images = n
        self.transform = transform
        self.class_names = self.config.class_names
        self.num_classes = self.config.num_classes

    def __getstate__(self):
        # a cached split travels as its path (DataLoader workers started by spawn reopen the memory maps) rather
        # than as a copy of every image
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["arrays"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.arrays is None:
            files = _split_files(self.cache_path, self.split, _cached_sizes_at_least(self.cache_path, self.split,
                                                                                    self.num_images))
            self.arrays = _load_cached(self.config, files, self.num_images)

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, i: int) -> Sample:
        """Item ``i`` without the transform."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"SyntheticBoxDataset: index {i} out of range for {len(self)} images")
        i %= len(self)
        a = self.arrays
        k0, k1 = int(a.offsets[i]), int(a.offsets[i + 1])
        return sample_from_instances(np.array(a.images[i]), np.array(a.instances[i]), a.labels[k0:k1].copy(),
                                     self.config.void_band, image_id(self.split, i), a.boxes[k0:k1].copy())

    def __getitem__(self, i: int) -> Sample:
        s = self.load(i)
        return self.transform(s) if self.transform is not None else s
