"""One image of the benchmark: a scene layout painted over a cluttered background, then lit, blurred and noised.

Every step draws from the image's own generator in a fixed order, so an image is a function of
``(config, seed, split, index)`` alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from boxloss.data._synthetic.appearance import TEXTURES, class_colours, paint, random_colours, smooth_noise
from boxloss.data._synthetic.classes import ClassRecipe, class_recipe, shape_mask
from boxloss.data._synthetic.config import SyntheticConfig
from boxloss.data._synthetic.layout import Layout, clip, lay_out, place


def background(rng: np.random.Generator, H: int, W: int, recipes: dict[int, ClassRecipe]) -> np.ndarray:
    """(H, W, 3) float32: a smooth two-colour field with coloured noise, and one to three large textured regions
    (wall, floor, table), half of them in the colours of a class of ``recipes``."""
    S = float(np.sqrt(H * W))
    pool = list(recipes)
    ca, cb = random_colours(rng)
    img = ca + (cb - ca) * smooth_noise(rng, H, W, int(rng.integers(1, 4)), int(rng.integers(1, 4)))[..., None]
    img += (
        smooth_noise(rng, H, W, int(rng.integers(3, 7)), int(rng.integers(3, 7)), channels=3) - np.float32(0.5)
    ) * np.float32(0.25)
    img = np.ascontiguousarray(img, np.float32)
    yy = np.arange(H, dtype=np.float32)[:, None] - np.float32(H / 2)
    xx = np.arange(W, dtype=np.float32)[None, :] - np.float32(W / 2)
    for _ in range(int(rng.integers(1, 4))):  # large textured regions (wall, floor, table), often in class colours
        a = rng.uniform(0, 2 * np.pi)
        proj = xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a))
        t = rng.uniform(-0.4, 0.4) * S
        region = proj > t if rng.random() < 0.5 else np.abs(proj - t) < rng.uniform(0.05, 0.2) * S
        c1, c2 = (
            class_colours(rng, recipes[pool[int(rng.integers(len(pool)))]])
            if rng.random() < 0.5
            else random_colours(rng)
        )
        paint(
            rng,
            img,
            region,
            (slice(0, H), slice(0, W)),
            c1,
            c2,
            TEXTURES[int(rng.integers(len(TEXTURES)))],
            rng.uniform(2.0, 8.0),
            S * 0.4,
            contrast=rng.uniform(0.2, 1.0),
        )
    return img


def paint_distractors(
    rng: np.random.Generator, img: np.ndarray, max_count: int, recipes: dict[int, ClassRecipe]
) -> None:
    """Up to ``max_count`` object-like shapes in mismatched colours (a thick stroke, an ellipse, or one class's
    shape in another class's colours and texture; classes of ``recipes``), painted into ``img``."""
    H, W = img.shape[:2]
    S = float(np.sqrt(H * W))
    pool = list(recipes)
    for _ in range(int(rng.integers(0, max_count + 1))):
        shape_cls, colour_cls = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
        if len(pool) > 1:
            while colour_cls == shape_cls:
                colour_cls = pool[int(rng.integers(len(pool)))]
        d = int(np.clip(S * rng.uniform(0.1, 0.35), 6, 0.9 * min(H, W)))
        kind = rng.random()
        if kind < 0.35:  # a thick stroke
            m = np.zeros((d, d), bool)
            t = max(1, d // int(rng.integers(6, 14)))
            m[d // 2 - t : d // 2 + t] = True
            if rng.random() < 0.5:
                m = m.T
        elif kind < 0.65:  # an ellipse
            ellipse = ClassRecipe(
                name="",
                fill_target=0.8,
                style="lobed",
                looseness=0.0,
                aspect=1.0 + rng.random(),
                rotation=np.pi,
                size=0.0,
                hue=0.0,
                texture="",
                frequency=0.0,
            )
            m = shape_mask(rng, ellipse, d)
        else:
            m = shape_mask(rng, recipes[shape_cls], d)
        y, x = place(rng, d, H, W, False)
        sl = clip(y, x, d, H, W)
        if sl is None:
            continue
        crec = recipes[colour_cls]
        c1, c2 = class_colours(rng, crec)
        paint(rng, img, m[sl[1]], sl[0], c1, c2, crec.texture, crec.frequency, d)


def paint_objects(rng: np.random.Generator, img: np.ndarray, layout: Layout, recipes: dict[int, ClassRecipe]) -> None:
    """The kept objects, in their class colours and (mostly) their class texture, only where they are visible."""
    H, W = img.shape[:2]
    for k, z in enumerate(layout.kept):
        o = layout.objects[z]
        rec = recipes[o.cls]
        img_sl, can_sl = o.clipped(H, W)
        region = layout.instances[img_sl] == k + 1
        if not region.any():
            continue
        kind = rec.texture if rng.random() < 0.7 else TEXTURES[int(rng.integers(len(TEXTURES)))]
        freq = rec.frequency * float(np.exp(rng.normal(0, 0.3)))
        c1, c2 = class_colours(rng, rec)
        paint(rng, img, region, img_sl, c1, c2, kind, freq, o.mask.shape[0])


def camera(rng: np.random.Generator, img: np.ndarray, max_blur: float, max_noise: float) -> np.ndarray:
    """(H, W, 3) uint8 of the painted ``img``: a linear illumination gradient, Gaussian blur and additive noise."""
    H, W = img.shape[:2]
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(a) * (np.arange(W, dtype=np.float32)[None, :] / W - 0.5) + np.sin(a) * (
        np.arange(H, dtype=np.float32)[:, None] / H - 0.5
    )
    img *= (np.float32(1.0) + np.float32(rng.uniform(0.1, 0.5)) * ramp.astype(np.float32))[..., None]
    sigma = rng.uniform(0.0, max_blur)
    if sigma > 0.2:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    noise = rng.uniform(0.0, max_noise)
    if noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    return (np.clip(img, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def render_scene(config: SyntheticConfig, rng: np.random.Generator, details: dict | None = None):
    """(image (H, W, 3) uint8, instances (H, W) uint8, labels (K,) int64) of one scene; ``details`` (a dict), if
    given, receives ``full_masks`` (K, H, W) bool (each object's whole shape inside the image) and ``depth`` (K,)."""
    H, W = config.image_size
    # The recipes of the classes objects are drawn from (0-based: class channel k + 1), in a fixed order.
    pool = [k - 1 for k in config.class_ids] if config.class_ids is not None else list(range(config.num_classes))
    recipes = {k: class_recipe(k) for k in pool}
    layout = lay_out(config, rng, recipes)
    if details is not None:
        details["full_masks"] = layout.full_masks()
        details["depth"] = layout.depth()
    img = background(rng, H, W, recipes)
    paint_distractors(rng, img, config.distractors, recipes)
    paint_objects(rng, img, layout, recipes)
    return camera(rng, img, config.blur, config.noise), layout.instances, layout.labels
