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

This module generates images and splits, caches them and serves them as a dataset; the generator's parts live in
:mod:`boxloss.data._synthetic`, one module per job (config, classes and shapes, appearance, layout, rendering,
cache).

Example:
    >>> from boxloss.data import SyntheticConfig, generate_sample
    >>> s = generate_sample(SyntheticConfig(image_size=64), "train", 0)
    >>> s.image.shape, s.mask.shape, s.boxes.shape[1]
    ((64, 64, 3), (64, 64), 4)
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from boxloss.data._synthetic.appearance import TEXTURES
from boxloss.data._synthetic.cache import (
    CACHE_ENV,
    SyntheticArrays,
    cache_path,
    cache_root,
    cached_size_at_least,
    load_cached,
    load_or_write,
    split_files,
)
from boxloss.data._synthetic.classes import FILL_RANGE, ClassRecipe, class_recipe
from boxloss.data._synthetic.config import (
    DEFAULT_SPLIT_SIZES,
    GENERATOR_VERSION,
    MAX_SYNTHETIC_CLASSES,
    SPLITS,
    SyntheticConfig,
    check_int,
    synthetic_class_names,
)
from boxloss.data._synthetic.layout import void_mask
from boxloss.data._synthetic.render import render_scene
from boxloss.data.sample import VOID, Sample, boxes_from_instances

__all__ = [
    "CACHE_ENV",
    "DEFAULT_SPLIT_SIZES",
    "FILL_RANGE",
    "GENERATOR_VERSION",
    "MAX_SYNTHETIC_CLASSES",
    "SPLITS",
    "TEXTURES",
    "ClassRecipe",
    "SceneLayout",
    "SyntheticArrays",
    "SyntheticBoxDataset",
    "SyntheticConfig",
    "cache_path",
    "cache_root",
    "class_recipe",
    "default_workers",
    "generate_sample",
    "generate_scene",
    "generate_split",
    "image_id",
    "load_or_generate",
    "sample_from_instances",
    "synthetic_class_names",
]

# doctest.testmod of this module also runs the example of the config it re-exports.
__test__ = {"SyntheticConfig": SyntheticConfig}


def _rng(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"synthetic: split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"synthetic: index must be an int >= 0, got {index!r}")
    return np.random.default_rng([config.seed, SPLITS.index(split), int(index)])


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def sample_from_instances(
    image: np.ndarray,
    instances: np.ndarray,
    labels: np.ndarray,
    void_band: int,
    image_id: str,
    boxes: np.ndarray | None = None,
) -> Sample:
    """Build a :class:`Sample` from an instance map: the mask is each instance's class with void where a
    (2 void_band + 1)-square window holds two different instances (or an instance and background)."""
    labels = np.asarray(labels, np.int64)
    lut = np.zeros(256, np.uint8)
    lut[1 : len(labels) + 1] = labels
    mask = lut[instances]
    mask[void_mask(instances, void_band)] = VOID
    if boxes is None:
        boxes = boxes_from_instances(instances, len(labels))
    return Sample(
        image=image,
        boxes=np.asarray(boxes, np.float32),
        labels=labels,
        mask=mask,
        image_id=image_id,
        instances=instances.astype(np.int32),
    )


def generate_sample(config: SyntheticConfig, split: str, index: int) -> Sample:
    """Generate image ``index`` of ``split`` on its own (identical to item ``index`` of the cached dataset).

    Example:
        >>> from boxloss.data import SyntheticConfig, generate_sample
        >>> a = generate_sample(SyntheticConfig(image_size=48, seed=3), "val", 5)
        >>> b = generate_sample(SyntheticConfig(image_size=48, seed=3), "val", 5)
        >>> bool((a.image == b.image).all() and (a.mask == b.mask).all())
        True
    """
    image, inst, labels = render_scene(config, _rng(config, split, index))
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
    image, inst, labels = render_scene(config, _rng(config, split, index), details)
    sample = sample_from_instances(image, inst, labels, config.void_band, image_id(split, index))
    return SceneLayout(sample, details["full_masks"], details["depth"])


def _generate_chunk(config: SyntheticConfig, split: str, start: int, stop: int):
    H, W = config.image_size
    images = np.empty((stop - start, H, W, 3), np.uint8)
    instances = np.empty((stop - start, H, W), np.uint8)
    boxes, labels, counts = [], [], []
    for i in range(start, stop):
        img, inst, lab = render_scene(config, _rng(config, split, i))
        images[i - start], instances[i - start] = img, inst
        boxes.append(boxes_from_instances(inst, len(lab)))
        labels.append(lab)
        counts.append(len(lab))
    return start, images, instances, np.concatenate(boxes), np.concatenate(labels), np.asarray(counts, np.int64)


def default_workers(n: int) -> int:
    return 1 if n < 64 else max(1, min(os.cpu_count() or 1, 8))


def generate_split(
    config: SyntheticConfig,
    split: str,
    num_images: int,
    *,
    workers: int | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> SyntheticArrays:
    """Generate images 0..num_images-1 of ``split`` (in ``workers`` processes; the result does not depend on it).

    ``out`` may give preallocated ``(images, instances)`` arrays (e.g. memory maps) to write into.
    """
    check_int("num_images", num_images, 0, 10**8)
    for k in range(config.num_classes):  # calibrate in the parent so forked workers inherit it
        class_recipe(k)
    H, W = config.image_size
    images, instances = (
        out if out is not None else (np.empty((num_images, H, W, 3), np.uint8), np.empty((num_images, H, W), np.uint8))
    )
    workers = default_workers(num_images) if workers is None else int(workers)
    chunk = max(1, min(64, -(-num_images // max(workers * 4, 1))))
    bounds = [(s, min(s + chunk, num_images)) for s in range(0, num_images, chunk)]
    parts = {}

    def take(result):
        start, im, ins, b, lab, cnt = result
        images[start : start + len(im)] = im
        instances[start : start + len(im)] = ins
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


def load_or_generate(
    config: SyntheticConfig,
    split: str,
    num_images: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[SyntheticArrays, Path]:
    """The first ``num_images`` of ``split``, from the cache if any cached run of at least that many exists,
    else generated and written there (atomically: files are renamed into place, so an interrupted or concurrent
    run never leaves a half-written split that looks complete). Returns the arrays and the cache folder."""
    _rng(config, split, 0)  # validates split
    return load_or_write(
        config,
        split,
        num_images,
        lambda out: generate_split(config, split, num_images, workers=workers, out=out),
        cache_dir=cache_dir,
        log=log,
    )


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

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        config: SyntheticConfig | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache: bool = True,
        workers: int | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.config = config if config is not None else SyntheticConfig()
        if not isinstance(self.config, SyntheticConfig):
            raise TypeError(f"SyntheticBoxDataset: config must be a SyntheticConfig, got {type(config).__name__}")
        _rng(self.config, split, 0)
        self.split = split
        n = DEFAULT_SPLIT_SIZES[split] if num_images is None else num_images
        check_int("num_images", n, 0, 10**8)
        if cache:
            self.arrays, self.cache_path = load_or_generate(
                self.config, split, n, cache_dir=cache_dir, workers=workers, log=log
            )
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
            files = split_files(
                self.cache_path, self.split, cached_size_at_least(self.cache_path, self.split, self.num_images)
            )
            self.arrays = load_cached(self.config, files, self.num_images)

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, i: int) -> Sample:
        """Item ``i`` without the transform."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"SyntheticBoxDataset: index {i} out of range for {len(self)} images")
        i %= len(self)
        a = self.arrays
        k0, k1 = int(a.offsets[i]), int(a.offsets[i + 1])
        return sample_from_instances(
            np.array(a.images[i]),
            np.array(a.instances[i]),
            a.labels[k0:k1].copy(),
            self.config.void_band,
            image_id(self.split, i),
            a.boxes[k0:k1].copy(),
        )

    def __getitem__(self, i: int) -> Sample:
        s = self.load(i)
        return self.transform(s) if self.transform is not None else s
