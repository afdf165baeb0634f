"""Object classes: a fixed recipe per class number, with a shape family calibrated to a target fill rate."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from boxloss.data._synthetic.appearance import TEXTURES
from boxloss.data._synthetic.config import MAX_SYNTHETIC_CLASSES


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


@functools.cache
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
        name=f"syn{k + 1:02d}",
        fill_target=float(target),
        style=style,
        looseness=0.0,
        aspect=aspect,
        rotation=float(rotation),
        size=float(rng.uniform(0.3, 0.5)),
        hue=float((k * 0.618034) % 1.0),
        texture=TEXTURES[k % len(TEXTURES)],
        frequency=float(2.0 + (k * 1.37) % 4.0),
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
            m = shape_mask(rng, dataclasses.replace(recipe, looseness=float(lam)), 48)
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


def shape_mask(rng: np.random.Generator, recipe: ClassRecipe, d: int) -> np.ndarray:
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
