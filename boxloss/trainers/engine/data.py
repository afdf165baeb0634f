"""Datasets for the trainers and deterministic batches.

``--data synthetic`` is the embedded benchmark of :mod:`boxloss.data` (generated once and cached), ``voc:PATH`` a
PASCAL VOC layout (``train`` / ``val`` id lists, SBD's ``train_aug`` with ``SegmentationClassAug`` when present) and
``coco:ANNOTATIONS:IMAGES`` a COCO instances file (every fifth image held out for validation unless
``val_data`` names a second one).

Batches are a function of (seed, step): each epoch is a permutation drawn from a generator seeded with the seed and
the epoch, and each sample's augmentation from ``numpy.random.default_rng([seed, step, index])``. A run resumed at
step s therefore sees exactly the batches an uninterrupted run sees from step s, and under ``torchrun`` process r
takes its share of the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import boxloss
from boxloss.data import Sample, collate_samples
from boxloss.trainers.engine import distributed


class DataSpecError(ValueError):
    """A ``--data`` value that cannot be read; the message names it."""


@dataclass
class Splits:
    """A dataset's training and validation samples and its classes (channel k + 1 is ``class_names[k]``)."""

    train: Sequence[Sample]
    val: Sequence[Sample]
    class_names: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class InMemory(Sequence):
    """The samples of a dataset loaded once (fast indexing for small datasets)."""

    def __init__(self, dataset, limit: int | None = None):
        n = len(dataset) if limit is None else min(limit, len(dataset))
        self.items = [dataset[i] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def load_splits(
    spec: str,
    *,
    num_classes: int = 6,
    image_size: int = 256,
    train_images: int = 2000,
    val_images: int = 500,
    data_seed: int = 0,
    class_ids: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
) -> Splits:
    """The training and validation splits ``spec`` names (see the module docstring)."""
    if spec == "synthetic":
        from boxloss.data import SyntheticBoxDataset, SyntheticConfig

        cfg = SyntheticConfig(
            seed=data_seed,
            num_classes=num_classes,
            image_size=image_size,
            **({"class_ids": tuple(class_ids)} if class_ids is not None else {}),
        )
        train = InMemory(SyntheticBoxDataset("train", train_images, cfg, log=log))
        val = InMemory(SyntheticBoxDataset("val", val_images, cfg, log=log))
        return Splits(
            train,
            val,
            tuple(cfg.class_names),
            f"synthetic benchmark {cfg.key()} ({image_size} px, "
            f"{num_classes} classes, {len(train)} train / {len(val)} val images)",
        )
    kind, _, rest = spec.partition(":")
    if kind == "voc":
        from boxloss.data import VOCBoxDataset

        root = Path(rest)
        if not rest or not root.is_dir():
            raise DataSpecError(
                f"--data voc:PATH: {rest!r} is not a folder (give the VOC root holding "
                "JPEGImages, Annotations and ImageSets)"
            )
        aug = root / "ImageSets" / "SegmentationAug" / "train_aug.txt"
        if aug.is_file() and (root / "SegmentationClassAug").is_dir():
            train = VOCBoxDataset(
                root, "train_aug", masks="SegmentationClassAug", image_set_dir="ImageSets/SegmentationAug"
            )
        else:
            train = VOCBoxDataset(root, "train")
        val = VOCBoxDataset(root, "val")
        return Splits(train, val, tuple(train.class_names), f"VOC at {root} ({len(train)} train / {len(val)} val)")
    if kind == "coco":
        from boxloss.data import COCOBoxDataset

        ann, sep, images = rest.rpartition(":")
        if not sep or not ann or not images:
            raise DataSpecError(
                f"--data coco:ANNOTATIONS:IMAGES: could not split {rest!r} into an annotation file and an image folder"
            )
        if not Path(ann).is_file():
            raise DataSpecError(f"--data coco: the annotation file {ann!r} does not exist")
        full = COCOBoxDataset(ann, images, on_error="skip")
        index = np.arange(len(full))
        train = torch.utils.data.Subset(full, index[index % 5 != 4].tolist())
        val = torch.utils.data.Subset(full, index[index % 5 == 4].tolist())
        return Splits(train, val, tuple(full.class_names), f"COCO {ann} ({len(train)} train / {len(val)} held out)")
    raise DataSpecError(f"--data must be 'synthetic', 'voc:PATH' or 'coco:ANNOTATIONS:IMAGES', got {spec!r}")


def config_splits(config, *, log: Callable[[str], None] | None = None) -> Splits:
    """The splits a trainer's config names: its ``data``, ``num_classes``, ``image_size``, ``train_images``,
    ``val_images`` and ``data_seed``."""
    return load_splits(
        config.data,
        num_classes=config.num_classes,
        image_size=config.image_size,
        train_images=config.train_images,
        val_images=config.val_images,
        data_seed=config.data_seed,
        log=log,
    )


class Batches:
    """Deterministic batches over ``dataset`` (a sequence of items).

    Args:
        dataset: indexable items (``Sample`` or anything ``collate`` packs).
        batch_size: items per process per step (the global batch is ``batch_size`` times the process count).
        seed: the permutation and augmentation seed.
        collate: packs a list of items (default :func:`boxloss.data.collate_samples`).
        augment: ``augment(item, rng) -> item`` with a ``numpy.random.Generator``, applied per item.
    """

    def __init__(
        self, dataset, batch_size: int, seed: int, *, collate: Callable | None = None, augment: Callable | None = None
    ):
        if len(dataset) == 0:
            raise ValueError("Batches: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.collate = collate_samples if collate is None else collate
        self.augment = augment

    @property
    def global_batch(self) -> int:
        return self.batch_size * distributed.world_size()

    def indices(self, step: int) -> list[int]:
        """The dataset indices this process uses at ``step``."""
        n, g = len(self.dataset), self.global_batch
        start = step * g
        out = []
        while len(out) < g:
            epoch, offset = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            take = min(g - len(out), n - offset)
            out += perm[offset : offset + take].tolist()
        r = distributed.rank()
        return out[r * self.batch_size : (r + 1) * self.batch_size]

    def batch(self, step: int):
        items = []
        for i in self.indices(step):
            item = self.dataset[i]
            if self.augment is not None:
                item = self.augment(item, np.random.default_rng([self.seed, step, i]))
            items.append(item)
        return self.collate(items)

    def iterate(self, start: int, stop: int) -> Iterator:
        for step in range(start, stop):
            yield self.batch(step)


class LoaderBatches:
    """A user's DataLoader as a batch source: epochs are re-iterated; a resumed run skips the batches of the steps
    already done in the current epoch (exact when the loader's order depends only on its own seeded sampler)."""

    def __init__(self, loader):
        self.loader = loader

    def iterate(self, start: int, stop: int) -> Iterator:
        step = start
        n = len(self.loader)
        skip = start % n if n else 0
        while step < stop:
            for i, batch in enumerate(self.loader):
                if skip:
                    if i < skip:
                        continue
                    skip = 0
                yield batch
                step += 1
                if step >= stop:
                    return


def hflip_augment(sample: Sample, rng: np.random.Generator) -> Sample:
    """A horizontal flip with probability 1/2 (boxes, masks and instances flipped too)."""
    from boxloss.data.transforms import hflip

    return hflip(sample) if rng.random() < 0.5 else sample


def box_label_map(sample: Sample, num_classes: int) -> np.ndarray:
    """(H, W) uint8: the sample's boxes painted with their labels (0 outside every box), the smaller box in front
    where boxes overlap (Box2Seg Sec. 3.1; :func:`boxloss.boxes_to_masks`)."""
    if sample.num_boxes == 0:
        return np.zeros((sample.height, sample.width), np.uint8)
    labels = boxloss.boxes_to_masks(
        torch.from_numpy(sample.boxes),
        torch.zeros(sample.num_boxes, dtype=torch.long),
        torch.from_numpy(sample.labels),
        (1, sample.height, sample.width),
        num_classes,
        form="labels",
    )[0]
    return labels.to(torch.uint8).numpy()
