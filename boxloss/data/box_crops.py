"""Single-class box-crop datasets (Box to Tag and Back, Ji & Veksler, BMVC 2021, Sec. 4.1).

For one class, every box of that class is cropped with a ``border``-pixel
margin taken from the image around it (3 in the paper).  Border pixels that lie
in another object's box are void, and so is any part of the margin outside the
image.  Boxes whose longer side is at most ``min_side`` pixels (50) are skipped,
and, by default, boxes that intersect a box of another class.  Crops are
resized to ``size`` x ``size`` (256).  :func:`paste_crop` maps a crop's
prediction back to image coordinates, for the pseudo ground truth of Sec. 4.3
(:func:`boxloss.merge_box_masks`).

Pixels follow the box convention of :mod:`boxloss.ops.boxes` at scale 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from boxloss.ops.boxes import box_pixel_ranges

VOID = 255


@dataclass
class BoxCrop:
    """One crop.  ``image`` (3, S, S) float32 in [0, 1]; ``valid`` (S, S) bool (False: void);
    ``border`` (S, S) bool, the margin (known background where valid); ``label`` the box class;
    ``image_index``, ``box_index`` where it came from; ``window`` (y0, x0, y1, x1), the crop in
    image pixels including the margin (it may extend past the image: that part is void); ``box`` (4,)
    float32, the box inside the crop in crop pixels (the crop minus its margin, after resizing);
    ``mask`` (S, S) uint8, the true mask of the box's class where the image has one (1 object, 0
    background, 255 void or outside the image), else ``None``."""

    image: torch.Tensor
    valid: torch.Tensor
    border: torch.Tensor
    label: int
    image_index: int
    box_index: int
    window: tuple[int, int, int, int]
    box: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class CropBatch:
    """Crops stacked for a network: ``images`` (N, 3, S, S), ``valid`` and ``border`` (N, S, S) bool, ``boxes``
    (N, 4) in crop pixels, ``labels`` (N,), ``masks`` (N, S, S) uint8 or ``None`` (when any crop lacks one),
    ``image_index`` and ``box_index`` (N,)."""

    images: torch.Tensor
    valid: torch.Tensor
    border: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    image_index: torch.Tensor
    box_index: torch.Tensor


def collate_crops(crops: list[BoxCrop]) -> CropBatch:
    """Stacks crops of one size into a :class:`CropBatch`; use as ``DataLoader(..., collate_fn=collate_crops)``."""
    if len(crops) == 0:
        raise ValueError("collate_crops: got an empty list of crops")
    for i, c in enumerate(crops):
        if not isinstance(c, BoxCrop):
            raise TypeError(f"collate_crops: element {i} is a {type(c).__name__}, not a BoxCrop")
        if c.image.shape != crops[0].image.shape:
            raise ValueError(
                f"collate_crops: crop {i} has shape {tuple(c.image.shape)}, crop 0 {tuple(crops[0].image.shape)}; "
                "crop with one size"
            )
        if c.box is None:
            raise ValueError(f"collate_crops: crop {i} has no box (make crops with crop_boxes)")
    masks = None
    if all(c.mask is not None for c in crops):
        masks = torch.stack([c.mask for c in crops])
    return CropBatch(
        images=torch.stack([c.image for c in crops]),
        valid=torch.stack([c.valid for c in crops]),
        border=torch.stack([c.border for c in crops]),
        boxes=torch.stack([c.box for c in crops]),
        labels=torch.tensor([c.label for c in crops], dtype=torch.long),
        masks=masks,
        image_index=torch.tensor([c.image_index for c in crops], dtype=torch.long),
        box_index=torch.tensor([c.box_index for c in crops], dtype=torch.long),
    )


def _spans(boxes, H, W):
    """(rows, cols) as ranges for each box; both empty for a box that covers nothing."""
    spans = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist():
        r0, r1, c0, c1 = box_pixel_ranges(box, H, W)
        spans.append((range(r0, r1), range(c0, c1)))
    return spans


def crop_boxes(
    image,
    boxes,
    labels,
    class_id: int,
    *,
    image_index: int = 0,
    border: int = 3,
    min_side: int = 50,
    skip_other_classes: bool = True,
    size: int = 256,
    skipped: Counter | None = None,
    mask=None,
) -> list[BoxCrop]:
    """The crops of the boxes of ``class_id`` in one image (uint8 (H, W, 3)); skips are
    counted in ``skipped`` under ``"small"``, ``"other-class-overlap"`` and ``"empty"``.
    ``mask``, the image's (H, W) uint8 class mask (255 void), gives each crop its ``mask``."""
    fn = "crop_boxes"
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{fn}: image must be a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    if border < 0 or min_side < 0 or size < 1:
        raise ValueError(f"{fn}: border and min_side must be >= 0 and size >= 1, got {border}, {min_side}, {size}")
    labels = np.asarray(labels).reshape(-1)
    H, W = image.shape[:2]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.uint8 or mask.shape != (H, W):
            raise ValueError(f"{fn}: mask must be a uint8 ({H}, {W}) array, got {mask.dtype} {mask.shape}")
    spans = _spans(boxes, H, W)
    if len(spans) != labels.shape[0]:
        raise ValueError(f"{fn}: labels must have one entry per box ({len(spans)}), got {labels.shape[0]}")
    skipped = skipped if skipped is not None else Counter()
    in_box = np.zeros((len(spans), H, W), dtype=bool)
    for k, (rows, cols) in enumerate(spans):
        in_box[k, rows.start : rows.stop, cols.start : cols.stop] = True
    crops = []
    for k, ((rows, cols), label) in enumerate(zip(spans, labels.tolist())):
        if label != class_id:
            continue
        if len(rows) == 0:
            skipped["empty"] += 1
            continue
        if max(len(rows), len(cols)) <= min_side:
            skipped["small"] += 1
            continue
        others = [j for j in range(len(spans)) if j != k]
        if skip_other_classes and any(labels[j] != class_id and in_box[j][in_box[k]].any() for j in others):
            skipped["other-class-overlap"] += 1
            continue
        y0, x0, y1, x1 = rows.start - border, cols.start - border, rows.stop + border, cols.stop + border
        h, w = y1 - y0, x1 - x0
        crop = np.zeros((h, w, 3), np.uint8)
        valid = np.zeros((h, w), bool)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        valid[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = True
        margin = np.ones((h, w), bool)
        margin[border : h - border, border : w - border] = False
        if others:
            other = in_box[others].any(0)[sy0:sy1, sx0:sx1]
            region = np.zeros((h, w), bool)
            region[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = other
            valid &= ~(margin & region)
        img = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0]

        def resize(m):
            nearest = torch.nn.functional.interpolate(
                torch.from_numpy(m)[None, None].float(), size=(size, size), mode="nearest"
            )
            return nearest[0, 0] > 0.5

        box = torch.tensor(
            [border * size / w, border * size / h, (w - border) * size / w, (h - border) * size / h],
            dtype=torch.float32,
        )
        target = None
        if mask is not None:
            window = np.full((h, w), VOID, np.uint8)
            m = mask[sy0:sy1, sx0:sx1]
            window[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = np.where(
                m == VOID, VOID, (m == class_id).astype(np.uint8)
            )
            nearest = torch.nn.functional.interpolate(  # as valid and border are resized
                torch.from_numpy(window)[None, None].float(), size=(size, size), mode="nearest"
            )
            target = nearest[0, 0].to(torch.uint8)
        crops.append(
            BoxCrop(
                img.clamp(0, 1),
                resize(valid),
                resize(margin),
                int(label),
                image_index,
                k,
                (y0, x0, y1, x1),
                box,
                target,
            )
        )
    return crops


def paste_crop(
    prediction: torch.Tensor, crop: BoxCrop, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps a (S, S) crop prediction back to the image: (values (H, W), covered (H, W) bool).

    The prediction is resized bilinearly to the crop window, the part outside the
    image is dropped, and values outside the window are 0 with ``covered`` False.
    Threshold it and pass it as a box mask to :func:`boxloss.merge_box_masks`."""
    H, W = image_size
    y0, x0, y1, x1 = crop.window
    p = torch.as_tensor(prediction, dtype=torch.float32)
    if p.dim() != 2:
        raise ValueError(f"paste_crop: prediction must be (S, S), got shape {tuple(p.shape)}")
    full = torch.nn.functional.interpolate(
        p[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
    )[0, 0]
    out = torch.zeros(H, W)
    covered = torch.zeros(H, W, dtype=torch.bool)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    out[sy0:sy1, sx0:sx1] = full[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    covered[sy0:sy1, sx0:sx1] = True
    return out, covered


class BoxCropDataset(torch.utils.data.Dataset):
    """The single-class dataset of ``class_id`` over samples with ``.image``, ``.boxes``
    and ``.labels`` (e.g. :class:`boxloss.data.Sample`) or (image, boxes, labels) tuples.

    ``skipped`` counts the boxes left out, by reason; a summary is in ``repr``.
    Items are :class:`BoxCrop`.
    """

    def __init__(
        self,
        samples,
        class_id: int,
        *,
        border: int = 3,
        min_side: int = 50,
        skip_other_classes: bool = True,
        size: int = 256,
    ) -> None:
        self.skipped: Counter = Counter()
        self.crops: list[BoxCrop] = []
        for i, s in enumerate(samples):
            image, boxes, labels = (s.image, s.boxes, s.labels) if hasattr(s, "image") else s[:3]
            self.crops += crop_boxes(
                image,
                boxes,
                labels,
                class_id,
                image_index=i,
                border=border,
                min_side=min_side,
                skip_other_classes=skip_other_classes,
                size=size,
                skipped=self.skipped,
                mask=getattr(s, "mask", None),
            )
        self.class_id = class_id

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> BoxCrop:
        return self.crops[i]

    def __repr__(self) -> str:
        return f"BoxCropDataset(class_id={self.class_id}, crops={len(self.crops)}, skipped={dict(self.skipped)})"
