"""Builders for the data tests: small samples with known geometry, and small VOC/COCO folders to corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from boxloss.data import Sample, SyntheticConfig, boxes_from_instances, export_coco, export_voc, generate_sample

SMALL = SyntheticConfig(image_size=(40, 56), seed=11)


def small_samples(split: str = "train", n: int = 3, config: SyntheticConfig = SMALL) -> list[Sample]:
    return [generate_sample(config, split, i) for i in range(n)]


def colour_of(mask: np.ndarray) -> np.ndarray:
    """An image whose red channel encodes the mask, so pixel moves can be checked exactly."""
    img = np.zeros(mask.shape + (3,), np.uint8)
    img[..., 0] = mask
    img[..., 1] = 7
    return img


def scene(height: int, width: int, rects: list[tuple[int, int, int, int, int]], holes: bool = False) -> Sample:
    """A sample from rectangles ``(label, top, left, bottom, right)`` painted in order (later ones in front), with
    exact instances, tight boxes around the visible parts, a mask without void and a colour-coded image. Rectangles
    that end up invisible are left out. ``holes`` cuts every other column out of each rectangle's interior, which
    makes the objects non-convex."""
    inst = np.zeros((height, width), np.int32)
    for k, (_, t, left, b, r) in enumerate(rects):
        region = np.zeros((height, width), bool)
        region[t:b, left:r] = True
        if holes and b - t > 2 and r - left > 2:
            region[t + 1 : b - 1, left + 1 : r - 1 : 2] = False
        inst[region] = k + 1
    visible = [k for k in range(len(rects)) if (inst == k + 1).any()]
    lut = np.zeros(len(rects) + 1, np.int32)
    lut[[k + 1 for k in visible]] = np.arange(1, len(visible) + 1)
    inst = lut[inst]
    labels = np.array([rects[k][0] for k in visible], np.int64)
    class_lut = np.zeros(len(visible) + 1, np.uint8)
    class_lut[1:] = labels
    mask = class_lut[inst]
    return Sample(colour_of(mask), boxes_from_instances(inst, len(visible)), labels, mask, "scene", inst)


def voc_folder(root: Path, n: int = 2, config: SyntheticConfig = SMALL, image_format: str = "png") -> list[Sample]:
    samples = small_samples("train", n, config)
    export_voc({"train": samples}, root, config.class_names, image_format=image_format)
    return samples


def coco_folder(root: Path, n: int = 2, config: SyntheticConfig = SMALL, image_format: str = "png"):
    samples = small_samples("train", n, config)
    files = export_coco({"train": samples}, root, config.class_names, image_format=image_format)
    return samples, files["train"], root / "train"


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def assert_same_sample(a: Sample, b: Sample, *, image: bool = True, instances: bool = False) -> None:
    assert a.image_id == b.image_id
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.mask, b.mask)
    if image:
        np.testing.assert_array_equal(a.image, b.image)
    if instances:
        np.testing.assert_array_equal(a.instances, b.instances)
