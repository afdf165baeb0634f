"""Scene layout: where the objects go, their depth order, and which stay visible enough to keep.

Objects are placed anywhere, across an image border, or overlapping an earlier object of another class; the depth
order is random (the smaller object is not always in front). Objects that end up badly hidden are brought to the
front once, and whatever is still too small is dropped, so that every kept object has a usable box and mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from boxloss.data._synthetic.classes import ClassRecipe, shape_mask
from boxloss.data._synthetic.config import SyntheticConfig


def place(rng, d: int, H: int, W: int, border: bool) -> tuple[int, int]:
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


def clip(y: int, x: int, d: int, H: int, W: int):
    """Image slices and canvas slices of a d x d canvas at (y, x); None if it misses the image."""
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + d, H), min(x + d, W)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def void_mask(instances: np.ndarray, band: int) -> np.ndarray:
    """Pixels whose (2 band + 1)-square window holds two different instances (or an instance and background)."""
    if band <= 0:
        return np.zeros(instances.shape, bool)
    size = 2 * band + 1
    return ndimage.maximum_filter(instances, size=size, mode="nearest") != ndimage.minimum_filter(
        instances, size=size, mode="nearest"
    )


@dataclass
class PlacedObject:
    """An object of class index ``cls`` (channel ``cls + 1``): its shape on a d x d canvas whose top-left corner is
    at ``(y, x)`` (possibly outside the image), and the shape's tight box ``(y0, x0, y1, x1)`` in image pixels."""

    cls: int
    mask: np.ndarray
    y: int
    x: int
    box: tuple[int, int, int, int]

    def clipped(self, H: int, W: int):
        """:func:`clip` of the object's canvas."""
        return clip(self.y, self.x, self.mask.shape[0], H, W)


@dataclass
class Layout:
    """The objects of one scene. ``objects``: every placed object, in order of creation; ``kept``: the indices of
    those left in the scene, in order of creation (kept object k is instance k + 1); ``order``: the kept objects back
    to front; ``instances``: (H, W) uint8, the instance of the front object at each pixel, 0 for background."""

    objects: list[PlacedObject]
    kept: list
    order: list
    instances: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """(K,) int64 class channels (1..L) of the kept objects."""
        return np.array([self.objects[z].cls + 1 for z in self.kept], np.int64)

    def full_masks(self) -> np.ndarray:
        """(K, H, W) bool: each kept object's whole shape inside the image, hidden parts included."""
        H, W = self.instances.shape
        full = np.zeros((len(self.kept), H, W), bool)
        for k, z in enumerate(self.kept):
            o = self.objects[z]
            img_sl, can_sl = o.clipped(H, W)
            full[k][img_sl] = o.mask[can_sl]
        return full

    def depth(self) -> np.ndarray:
        """(K,) int64: each kept object's rank back to front (0 is at the back)."""
        return np.array([self.order.index(z) for z in self.kept], np.int64)


def place_objects(
    config: SyntheticConfig, rng: np.random.Generator, recipes: dict[int, ClassRecipe]
) -> list[PlacedObject]:
    """Up to ``max_objects`` objects (geometric in number with mean ``mean_objects``): each of a random class of
    ``recipes``, or of another one than an earlier object it is placed to overlap; objects that miss the image are
    dropped."""
    H, W = config.image_size
    S = float(np.sqrt(H * W))
    pool = list(recipes)
    n = int(min(config.max_objects, rng.geometric(1.0 / config.mean_objects)))
    objects: list[PlacedObject] = []
    for _ in range(n):
        overlap = bool(objects) and rng.random() < config.overlap_prob
        if overlap:
            other = objects[int(rng.integers(len(objects)))]
            choices = [c for c in pool if c != other.cls] or [other.cls]
            cls = int(choices[int(rng.integers(len(choices)))])
        else:
            cls = pool[int(rng.integers(len(pool)))]
        rec = recipes[cls]
        d = int(np.clip(S * rec.size * np.exp(rng.normal(0, 0.3)), 10, 0.95 * min(H, W)))
        mask = shape_mask(rng, rec, d)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        shape_box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)  # the shape's tight box inside its canvas
        if overlap:  # the two shapes' boxes overlap: centres closer than 3/4 of the summed half sizes
            (oy0, ox0, oy1, ox1), (sy0, sx0, sy1, sx1) = other.box, shape_box
            cy = (oy0 + oy1) / 2 + rng.uniform(-0.75, 0.75) * ((oy1 - oy0) + (sy1 - sy0)) / 2
            cx = (ox0 + ox1) / 2 + rng.uniform(-0.75, 0.75) * ((ox1 - ox0) + (sx1 - sx0)) / 2
            y, x = int(round(cy - (sy0 + sy1) / 2)), int(round(cx - (sx0 + sx1) / 2))
        else:
            y, x = place(rng, d, H, W, rng.random() < config.border_prob)
        if clip(y, x, d, H, W) is not None:
            box = (y + shape_box[0], x + shape_box[1], y + shape_box[2], x + shape_box[3])
            objects.append(PlacedObject(cls=cls, mask=mask, y=y, x=x, box=box))
    return objects


def instance_map(objects: list[PlacedObject], order, H: int, W: int) -> np.ndarray:
    """(H, W) uint8: z + 1 where object z is the front one of ``order`` (back to front), 0 elsewhere."""
    inst = np.zeros((H, W), np.uint8)
    for z in order:
        o = objects[z]
        img_sl, can_sl = o.clipped(H, W)
        inst[img_sl][o.mask[can_sl]] = z + 1
    return inst


def visible_order(objects: list[PlacedObject], order: list, H: int, W: int, void_band: int) -> list:
    """``order`` (back to front) with the objects that are badly hidden (less than a quarter of their shape, or
    fewer than ``min_pixels``, visible; or too little left outside the void band) brought to the front once, and
    those still badly hidden then dropped (everything, if that does not settle within four rounds)."""
    min_pixels = max(12, int(0.0015 * H * W))
    for attempt in range(4):
        inst = instance_map(objects, order, H, W)
        visible = np.bincount(inst.ravel(), minlength=len(objects) + 1)[1:]
        core = np.bincount(inst[~void_mask(inst, void_band)].ravel(), minlength=len(objects) + 1)[1:]
        full = np.array([o.mask[o.clipped(H, W)[1]].sum() for o in objects])
        weak = [z for z in order if visible[z] < max(min_pixels, 0.25 * full[z]) or core[z] < min_pixels // 2]
        if not weak:
            return order
        if attempt == 0:  # bring badly hidden objects to the front once, then drop what is still too small
            order = [z for z in order if z not in weak] + weak
        else:
            order = [z for z in order if z not in weak]
    return []


def lay_out(config: SyntheticConfig, rng: np.random.Generator, recipes: dict[int, ClassRecipe]) -> Layout:
    """The objects of one scene, their depth order and instance map (kept objects numbered 1..K in order of
    creation)."""
    H, W = config.image_size
    objects = place_objects(config, rng, recipes)
    order = list(rng.permutation(len(objects)))  # back to front: the smaller object is not always in front
    order = visible_order(objects, order, H, W, config.void_band)
    inst = instance_map(objects, order, H, W)
    kept = sorted(order)
    lut = np.zeros(len(objects) + 1, np.uint8)
    lut[[z + 1 for z in kept]] = np.arange(1, len(kept) + 1)
    return Layout(objects=objects, kept=kept, order=order, instances=lut[inst])
