"""Appearance: colours, textures and the painting of a region with a shaded two-colour texture."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from boxloss.data._synthetic.classes import ClassRecipe

TEXTURES = ("stripes", "spots", "checker", "grain")


def hsv_to_rgb(h, s, v) -> np.ndarray:
    h = np.asarray(h, np.float64) % 1.0
    s = np.clip(s, 0, 1)
    v = np.clip(v, 0, 1)
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(x, -1) for x in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, np.broadcast_to(i, np.shape(h))[None, ..., None], 0)[0].astype(np.float32)


def class_colours(rng, recipe: ClassRecipe) -> tuple[np.ndarray, np.ndarray]:
    h = recipe.hue + rng.normal(0, 0.06)
    c1 = hsv_to_rgb(h, rng.uniform(0.35, 0.95), rng.uniform(0.35, 0.95))
    c2 = hsv_to_rgb(h + rng.uniform(-0.12, 0.12), rng.uniform(0.2, 0.9), rng.uniform(0.1, 0.9))
    return c1, c2


def random_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    h = rng.random()
    return (
        hsv_to_rgb(h, rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95)),
        hsv_to_rgb(h + rng.uniform(-0.3, 0.3), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95)),
    )


def smooth_noise(rng, h: int, w: int, cells_y: int, cells_x: int, channels: int = 0) -> np.ndarray:
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


def texture(rng, kind: str, frequency: float, h: int, w: int, scale: float) -> np.ndarray:
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
        n = smooth_noise(rng, h, w, cy, cx)
        return np.clip((n - np.float32(0.5)) * np.float32(3.0) + np.float32(0.5), 0, 1)
    if kind == "checker":
        period = max(2.0, 1.0 / f)
        oy, ox = rng.uniform(0, period, 2)
        y = ((np.arange(h) + oy) // (period / 2)).astype(np.int64)[:, None]
        x = ((np.arange(w) + ox) // (period / 2)).astype(np.int64)[None, :]
        return ((y + x) % 2).astype(np.float32)
    cells = max(1, int(min(h, w) * f * 4))
    return smooth_noise(rng, h, w, max(1, h * cells // max(min(h, w), 1)), max(1, w * cells // max(min(h, w), 1)))


def paint(
    rng,
    out: np.ndarray,
    region: np.ndarray,
    sl,
    c1,
    c2,
    kind: str,
    frequency: float,
    scale: float,
    contrast: float = 1.0,
) -> None:
    """Fill ``out[sl][region]`` with a shaded two-colour texture."""
    h, w = region.shape
    pat = texture(rng, kind, frequency, h, w, scale) * np.float32(contrast)
    ramp = np.linspace(-0.5, 0.5, max(h, w), dtype=np.float32)
    shade = 1.0 + np.float32(rng.uniform(-0.4, 0.4)) * (ramp[:h, None] if rng.random() < 0.5 else ramp[None, :w])
    col = (c1 + (c2 - c1) * pat[..., None]) * shade[..., None]
    target = out[sl]
    target[region] = col[region]
