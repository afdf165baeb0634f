"""How hard a box-supervised dataset is, measured the same way for the synthetic benchmark, VOC and COCO.

Why: box supervision is easy when boxes are nearly full (fill rate near 1) and never overlap; it matters when
objects fill their boxes loosely and boxes of different classes overlap. :func:`compute_statistics` measures that,
and :func:`format_report` prints it beside approximate published PASCAL VOC 2012 figures.

Definitions (per dataset):

- boxes per image: mean number of boxes;
- fill rate of a box: pixels labelled with the box's class inside the box / pixels inside the box that are not void
  (void pixels are unknown, so they count on neither side); per class, the mean over its boxes;
- pixels in >= 2 boxes: per image, the fraction of pixels whose centre lies in two or more boxes, averaged over images;
- images with overlapping boxes, boxes touching the border, void pixels: fractions;
- boxes without object pixels: boxes whose mask holds neither a pixel of their class nor a void pixel (which could
  hide the object) inside them, an annotation error such as a COCO polygon lying outside its image; counted, and
  the command line warns about them.

Example:
    >>> from boxloss.data import SyntheticBoxDataset, SyntheticConfig, compute_statistics, format_report
    >>> ds = SyntheticBoxDataset("train", 8, SyntheticConfig(image_size=64), cache=False)
    >>> st = compute_statistics(ds, ds.num_classes, ds.class_names)
    >>> st.num_images
    8
    >>> "boxes per image" in format_report(st, "synthetic")
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from boxloss.data.sample import VOID, Sample
from boxloss.ops.boxes import box_pixel_ranges

#: Approximate PASCAL VOC 2012 figures, with their sources. Printed beside the measured ones; not exact values.
VOC_REFERENCE = {
    "images": (
        "1,464 seg. train (10,582 with SBD)",
        "VOC 2012 segmentation train; SBD-augmented train_aug, as reported by BANA (CVPR 2021) Sec. 4.1 "
        "and LPG Sec. IV",
    ),
    "boxes_per_image": ("~2.4", "VOC 2012 devkit statistics: ~3,500 objects in the 1,464 segmentation train images"),
    "fill_range": (
        "~0.3 - 0.95",
        "per-class mean fill rates; the spread of VOC 2012 train fill rates is plotted in Box2Seg "
        "(ECCV 2020) Fig. 2 and BANA Fig. 4(b); widest for sofa, dining table, bicycle",
    ),
    "overlap": ("not published", "no published figure for the fraction of pixels in two or more boxes"),
}


@dataclass
class DatasetStatistics:
    """Measured statistics; ``class_fill`` (L,) and ``class_boxes`` (L,) are indexed by class channel - 1
    (``nan`` fill for a class with no box in an image with a mask; ``class_boxes`` counts every box)."""

    num_images: int
    num_boxes: int
    boxes_per_image: float
    class_fill: np.ndarray
    class_boxes: np.ndarray
    overlap_pixels: float
    images_with_overlap: float
    border_boxes: float
    void_pixels: float
    class_names: list[str] = field(default_factory=list)
    image_size: str = ""
    images_with_mask: int = 0
    boxes_without_object_pixels: int = 0
    first_box_without_object_pixels: str = ""

    @property
    def fill_range(self) -> tuple[float, float]:
        f = self.class_fill[np.isfinite(self.class_fill)]
        return (float(f.min()), float(f.max())) if f.size else (float("nan"), float("nan"))

    def to_dict(self) -> dict:
        return {
            "num_images": self.num_images,
            "num_boxes": self.num_boxes,
            "boxes_per_image": self.boxes_per_image,
            "class_fill": {
                n: (None if not np.isfinite(f) else float(f)) for n, f in zip(self.class_names, self.class_fill)
            },
            "class_boxes": {n: int(c) for n, c in zip(self.class_names, self.class_boxes)},
            "overlap_pixels": self.overlap_pixels,
            "images_with_overlap": self.images_with_overlap,
            "border_boxes": self.border_boxes,
            "void_pixels": self.void_pixels,
            "boxes_without_object_pixels": self.boxes_without_object_pixels,
        }


def coverage_count(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) int32: how many boxes cover each pixel, by the box convention of :mod:`boxloss.ops.boxes` (a 2-D
    difference array, no per-pixel loop)."""
    diff = np.zeros((height + 1, width + 1), np.int32)
    for box in boxes:
        r0, r1, c0, c1 = box_pixel_ranges(box, height, width)
        if r0 < r1 and c0 < c1:
            diff[r0, c0] += 1
            diff[r0, c1] -= 1
            diff[r1, c0] -= 1
            diff[r1, c1] += 1
    return diff.cumsum(0).cumsum(1)[:height, :width]


def compute_statistics(
    samples: Iterable[Sample], num_classes: int, class_names: Sequence[str] | None = None
) -> DatasetStatistics:
    """Statistics of any iterable of samples (a synthetic, VOC or COCO dataset). Fill rates need masks; samples
    without one count for everything else."""
    fill_sum = np.zeros(num_classes)
    fill_n = np.zeros(num_classes, np.int64)
    class_boxes = np.zeros(num_classes, np.int64)
    n_img = n_box = n_border = n_overlap_img = n_mask = n_empty = 0
    first_empty = ""
    overlap_sum = void_sum = 0.0
    sizes = set()
    for s in samples:
        n_img += 1
        h, w = s.height, s.width
        sizes.add((h, w))
        k = s.num_boxes
        n_box += k
        if k and (s.labels.max() > num_classes or s.labels.min() < 1):
            raise ValueError(
                f"compute_statistics: sample {s.image_id} has labels {s.labels.tolist()} outside 1..{num_classes}"
            )
        b = s.boxes.astype(np.float64)
        np.add.at(class_boxes, s.labels - 1, 1)
        if k:
            n_border += int(((b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= w) | (b[:, 3] >= h)).sum())
            cover = coverage_count(b, h, w)
            overlap_sum += float((cover >= 2).mean())
            n_overlap_img += int((cover >= 2).any())
        if s.mask is not None:
            n_mask += 1
            void_sum += float((s.mask == VOID).mean())
            for k, (box, label) in enumerate(zip(b, s.labels)):
                area = (box[2] - box[0]) * (box[3] - box[1])
                r0, r1, c0, c1 = box_pixel_ranges(box, h, w)
                crop = s.mask[r0:r1, c0:c1]
                if not ((crop == label) | (crop == VOID)).any():
                    n_empty += 1
                    first_empty = first_empty or f"image {s.image_id}, box {k} {tuple(float(v) for v in box)}"
                known = area - float((crop == VOID).sum())
                if known > 0:
                    fill_sum[label - 1] += float((crop == label).sum()) / known
                    fill_n[label - 1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        fill = np.where(fill_n > 0, fill_sum / np.maximum(fill_n, 1), np.nan)
    names = list(class_names) if class_names is not None else [str(c) for c in range(1, num_classes + 1)]
    size = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3]) + (" ..." if len(sizes) > 3 else "")
    return DatasetStatistics(
        num_images=n_img,
        num_boxes=n_box,
        boxes_per_image=n_box / max(n_img, 1),
        class_fill=fill,
        class_boxes=class_boxes,
        overlap_pixels=overlap_sum / max(n_img, 1),
        images_with_overlap=n_overlap_img / max(n_img, 1),
        border_boxes=n_border / max(n_box, 1),
        void_pixels=void_sum / max(n_mask, 1),
        class_names=names,
        image_size=size,
        images_with_mask=n_mask,
        boxes_without_object_pixels=n_empty,
        first_box_without_object_pixels=first_empty,
    )


def format_report(stats: DatasetStatistics, title: str = "dataset") -> str:
    """A plain-text table of ``stats`` beside the approximate VOC 2012 figures, with their sources."""
    lo, hi = stats.fill_range
    rows = [
        ("images", f"{stats.num_images} ({stats.image_size})", VOC_REFERENCE["images"][0]),
        ("boxes per image", f"{stats.boxes_per_image:.2f}", VOC_REFERENCE["boxes_per_image"][0]),
        ("per-class fill rate, range", f"{lo:.2f} - {hi:.2f}", VOC_REFERENCE["fill_range"][0]),
        ("pixels in >= 2 boxes", f"{100 * stats.overlap_pixels:.1f}%", VOC_REFERENCE["overlap"][0]),
        ("images with overlapping boxes", f"{100 * stats.images_with_overlap:.1f}%", "-"),
        ("boxes touching the border", f"{100 * stats.border_boxes:.1f}%", "-"),
        ("void pixels", f"{100 * stats.void_pixels:.1f}%", "-"),
        ("boxes without object pixels", f"{stats.boxes_without_object_pixels}", "-"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(title), max(len(r[1]) for r in rows))
    lines = [f"{'':<{w0}}  {title:<{w1}}  PASCAL VOC 2012 (approx.)", "-" * (w0 + w1 + 30)]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines += ["", "per-class fill rate (pixels of the class in its box / non-void pixels in the box):"]
    lines += [
        f"  {n:<14} {f'{f:.2f}' if np.isfinite(f) else ' n/a'}   ({c} boxes)"
        for n, f, c in zip(stats.class_names, stats.class_fill, stats.class_boxes)
    ]
    if stats.images_with_mask < stats.num_images:
        lines.append(f"  (fill rates from the {stats.images_with_mask} of {stats.num_images} images with masks)")
    lines += ["", "VOC figures are approximate; sources:"]
    lines += [f"  {k}: {v[1]}" for k, v in VOC_REFERENCE.items()]
    return "\n".join(lines)
