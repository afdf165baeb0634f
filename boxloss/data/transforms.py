"""Augmentations that keep image, mask, instances, valid pixels and boxes consistent.

Why: a segmentation augmentation that moves the mask but not the boxes (or crops a box without saying so) silently
corrupts box supervision. Here every geometric operation is applied to all of a sample's fields at once:

- :func:`resize` scales the image bilinearly, mask/instances/valid by nearest neighbour at pixel centres, and boxes
  by the exact size ratio (box edges then lie within 0.5 pixel of the resized object's extent);
- :func:`crop` cuts a window that may extend past the image: outside pixels are padding (image ``fill``, mask void
  255, ``valid`` False). Boxes are shifted and clipped; a clipped box is re-tightened around its object's remaining
  pixels when the sample has ``instances``, and dropped when nothing of it is left (narrower than ``min_size``, or
  no pixel of its object inside). Clipped and dropped boxes are counted in ``sample.info``;
- :func:`hflip` mirrors everything (``x0' = W - x1``, ``x1' = W - x0``);
- :func:`pad` adds padding at the bottom and right (to a size or a multiple of a divisor);
- :class:`ColorJitter` changes only the image.

The random classes draw from a ``numpy.random.Generator``. :class:`Compose` makes one per sample from torch's RNG,
so augmentations differ between DataLoader workers and follow ``torch.manual_seed``.

Example:
    >>> from boxloss.data import SyntheticBoxDataset, SyntheticConfig
    >>> from boxloss.data.transforms import Compose, RandomScale, RandomCrop, RandomHorizontalFlip, ColorJitter
    >>> aug = Compose([RandomScale(0.5, 2.0), RandomCrop(48), RandomHorizontalFlip(), ColorJitter(0.2, 0.2, 0.2)])
    >>> ds = SyntheticBoxDataset("train", 2, SyntheticConfig(image_size=64), cache=False, transform=aug)
    >>> ds[0].image.shape
    (48, 48, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from boxloss.data.sample import VOID, Sample, boxes_from_instances


def _size(size, name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{name}: size must be a positive int or (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _count(info: dict, key: str, n: int) -> dict:
    info = dict(info)
    if n:
        info[key] = int(info.get(key, 0)) + int(n)
    return info


def _nearest(a: np.ndarray | None, out_h: int, out_w: int) -> np.ndarray | None:
    if a is None:
        return None
    h, w = a.shape[:2]
    # source pixel under each output pixel centre: floor((i + 1/2) * h / out_h), in exact integer arithmetic
    rows = (2 * np.arange(out_h, dtype=np.int64) + 1) * h // (2 * out_h)
    cols = (2 * np.arange(out_w, dtype=np.int64) + 1) * w // (2 * out_w)
    return a[rows[:, None], cols[None, :]]


def resize(sample: Sample, height: int, width: int) -> Sample:
    """The sample resized to ``height`` x ``width`` (boxes scaled by ``width / W`` and ``height / H``)."""
    height, width = _size((height, width), "resize")
    h, w = sample.height, sample.width
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.Resampling.BILINEAR))
    sx, sy = width / w, height / h
    boxes = (sample.boxes.astype(np.float64) * np.array([sx, sy, sx, sy])).astype(np.float32)
    return Sample(
        image,
        boxes,
        sample.labels.copy(),
        _nearest(sample.mask, height, width),
        sample.image_id,
        _nearest(sample.instances, height, width),
        _nearest(sample.valid, height, width),
        dict(sample.info),
    )


def hflip(sample: Sample) -> Sample:
    """The sample mirrored left-right."""
    w = float(sample.width)
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
    flip = lambda a: None if a is None else np.ascontiguousarray(a[:, ::-1])  # noqa: E731
    return Sample(
        flip(sample.image),
        boxes,
        sample.labels.copy(),
        flip(sample.mask),
        sample.image_id,
        flip(sample.instances),
        flip(sample.valid),
        dict(sample.info),
    )


def crop(
    sample: Sample,
    top: int,
    left: int,
    height: int,
    width: int,
    *,
    fill: Sequence[int] | int = 0,
    min_size: float = 1.0,
) -> Sample:
    """The window rows ``top .. top+height-1``, columns ``left .. left+width-1`` (which may extend past the image;
    such pixels are padding). See the module docstring for what happens to boxes."""
    height, width = _size((height, width), "crop")
    top, left = int(top), int(left)
    h, w = sample.height, sample.width
    sy0, sy1, sx0, sx1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
    src = (slice(sy0, max(sy1, sy0)), slice(sx0, max(sx1, sx0)))
    dst = (slice(sy0 - top, sy0 - top + max(sy1 - sy0, 0)), slice(sx0 - left, sx0 - left + max(sx1 - sx0, 0)))

    def cut(a, value, dtype):
        if a is None:
            return None
        out = np.empty((height, width) + a.shape[2:], dtype)
        out[...] = value
        out[dst] = a[src]
        return out

    image = cut(sample.image, np.asarray(fill, np.uint8), np.uint8)
    mask = cut(sample.mask, VOID, np.uint8)
    instances = cut(sample.instances, 0, np.int32)
    valid = cut(np.ones((h, w), bool) if sample.valid is None else sample.valid, False, bool)

    k = sample.num_boxes
    shifted = sample.boxes.astype(np.float64) - np.array([left, top, left, top], np.float64)
    limit = np.array([width, height, width, height], np.float64)
    clipped = np.clip(shifted, 0.0, limit)
    was_clipped = (clipped != shifted).any(axis=1)
    keep = np.ones(k, bool)
    if was_clipped.any():
        if instances is not None:
            tight = boxes_from_instances(instances, k).astype(np.float64)
            empty = np.isnan(tight).any(axis=1)
            tight = np.where(empty[:, None], clipped, tight)
            inter = np.concatenate(
                [np.maximum(clipped[:, :2], tight[:, :2]), np.minimum(clipped[:, 2:], tight[:, 2:])], axis=1
            )
            clipped = np.where(was_clipped[:, None], inter, clipped)
            keep &= ~(was_clipped & empty)
        too_small = ((clipped[:, 2] - clipped[:, 0]) < min_size) | ((clipped[:, 3] - clipped[:, 1]) < min_size)
        keep &= ~(was_clipped & too_small)
    if instances is not None and not keep.all():
        lut = np.zeros(k + 1, np.int32)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        instances = lut[instances]
    info = _count(sample.info, "boxes_dropped", int((~keep).sum()))
    info = _count(info, "boxes_clipped", int((was_clipped & keep).sum()))
    return Sample(
        image,
        clipped[keep].astype(np.float32),
        sample.labels[keep].copy(),
        mask,
        sample.image_id,
        instances,
        valid,
        info,
    )


def pad(
    sample: Sample,
    height: int | None = None,
    width: int | None = None,
    *,
    divisor: int | None = None,
    fill: Sequence[int] | int = 0,
) -> Sample:
    """Pad at the bottom and right to ``height`` x ``width`` (at least the current size) or, with ``divisor``, to
    the next multiple of it. Padding is image ``fill``, mask void and ``valid`` False; boxes do not move."""
    h, w = sample.height, sample.width
    th, tw = max(h, height or 0), max(w, width or 0)
    if divisor is not None:
        if isinstance(divisor, bool) or not isinstance(divisor, (int, np.integer)) or divisor < 1:
            raise ValueError(f"pad: divisor must be a positive int, got {divisor!r}")
        th, tw = -(-th // divisor) * divisor, -(-tw // divisor) * divisor
    if (th, tw) == (h, w):
        return sample
    return crop(sample, 0, 0, th, tw, fill=fill)


def _fresh_rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class Compose:
    """Apply transforms in order with one generator per sample (``rng`` if given, else drawn from torch's RNG)."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _fresh_rng() if rng is None else rng
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Resize by a factor drawn uniformly from [min_scale, max_scale] (the same for height and width)."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomScale: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _fresh_rng() if rng is None else rng
        s = rng.uniform(self.min_scale, self.max_scale)
        return resize(sample, max(1, round(sample.height * s)), max(1, round(sample.width * s)))

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """A random ``size`` window; an image smaller than ``size`` is padded at the bottom/right (void in the mask)."""

    def __init__(self, size, *, fill: Sequence[int] | int = 0, min_size: float = 1.0):
        self.size = _size(size, "RandomCrop")
        self.fill, self.min_size = fill, float(min_size)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _fresh_rng() if rng is None else rng
        ch, cw = self.size
        top = int(rng.integers(0, sample.height - ch + 1)) if sample.height > ch else 0
        left = int(rng.integers(0, sample.width - cw + 1)) if sample.width > cw else 0
        return crop(sample, top, left, ch, cw, fill=self.fill, min_size=self.min_size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _fresh_rng() if rng is None else rng
        return hflip(sample) if rng.random() < self.p else sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class Pad:
    """:func:`pad` as a transform (to a fixed size and/or a multiple of ``divisor``)."""

    def __init__(self, size=None, *, divisor: int | None = None, fill: Sequence[int] | int = 0):
        self.size = None if size is None else _size(size, "Pad")
        self.divisor, self.fill = divisor, fill

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        h, w = self.size if self.size is not None else (None, None)
        return pad(sample, h, w, divisor=self.divisor, fill=self.fill)


class ColorJitter:
    """Brightness, contrast and saturation factors drawn from [1 - x, 1 + x]; the image only."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"ColorJitter: {name} must be in [0, 1), got {v}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _fresh_rng() if rng is None else rng
        img = sample.image.astype(np.float32)
        b, c, s = (rng.uniform(1 - x, 1 + x) for x in (self.brightness, self.contrast, self.saturation))
        img *= b
        gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
        img = (img - gray.mean()) * c + gray.mean()
        gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
        img = gray[..., None] + (img - gray[..., None]) * s
        out = Sample(
            np.clip(img + 0.5, 0, 255).astype(np.uint8),
            sample.boxes,
            sample.labels,
            sample.mask,
            sample.image_id,
            sample.instances,
            sample.valid,
            dict(sample.info),
        )
        return out

    def __repr__(self) -> str:
        return f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation})"
