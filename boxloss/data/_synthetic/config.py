"""The parameters of a synthetic benchmark, checked, and the cache key they make."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

#: Bumped whenever the images a config produces change, so old caches are not reused.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES = {"train": 2000, "val": 500, "test": 500}
MAX_SYNTHETIC_CLASSES = 20


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
        if not (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
        ):
            raise ValueError(f"SyntheticConfig: image_size must be an int or (H, W) ints, got {self.image_size!r}")
        size = (int(size[0]), int(size[1]))
        if min(size) < 16 or max(size) > 4096:
            raise ValueError(f"SyntheticConfig: image_size must be between 16 and 4096 pixels, got {size}")
        object.__setattr__(self, "image_size", size)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("num_classes", self.num_classes, 1, MAX_SYNTHETIC_CLASSES)
        check_int("max_objects", self.max_objects, 1, 250)
        check_int("void_band", self.void_band, 0, 16)
        check_int("distractors", self.distractors, 0, 32)
        check_float("mean_objects", self.mean_objects, 1.0, float(self.max_objects))
        for name in ("overlap_prob", "border_prob"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        check_float("noise", self.noise, 0.0, 0.5)
        check_float("blur", self.blur, 0.0, 10.0)
        if self.class_ids is not None:
            ids = tuple(self.class_ids) if isinstance(self.class_ids, (tuple, list)) else None
            if (
                not ids
                or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in ids)
                or len(set(ids)) != len(ids)
                or not all(1 <= v <= self.num_classes for v in ids)
            ):
                raise ValueError(
                    f"SyntheticConfig: class_ids must be distinct class channels in 1..{self.num_classes}"
                    f", got {self.class_ids!r}"
                )
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


def check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"SyntheticConfig: {name} must be an int in [{lo}, {hi}], got {value!r}")


def check_float(name, value, lo, hi):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not (lo <= float(value) <= hi)
    ):
        raise ValueError(f"SyntheticConfig: {name} must be a number in [{lo}, {hi}], got {value!r}")


def synthetic_class_names(num_classes: int) -> list[str]:
    """``["syn01", ..., "synL"]``: the class names used in VOC and COCO exports of the benchmark."""
    return [f"syn{k:02d}" for k in range(1, num_classes + 1)]
