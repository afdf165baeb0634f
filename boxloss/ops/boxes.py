"""The box convention shared by every box op in boxloss, and helpers to build it.

Boxes are packed over the batch, as torchvision's ``roi_align`` takes them:

- ``boxes`` (K, 4) float: ``x0, y0, x1, y1`` in input-image pixels, continuous
  coordinates (image pixel (i, j) covers ``[j, j+1) x [i, i+1)``, so the tight
  box of a mask spanning columns ``j_min..j_max`` and rows ``i_min..i_max`` is
  ``(j_min, i_min, j_max + 1, i_max + 1)``);
- ``box_batch`` (K,) int64: the image each box belongs to;
- ``box_labels`` (K,) int64: the class channel of the box;
- ``spatial_scale``: map coordinate = image coordinate x spatial_scale (1/8 for
  a stride-8 output), as in ``roi_align``.

A box covers, along each axis, the map pixels whose centre lies in
``[lo * spatial_scale, hi * spatial_scale)`` after clipping to the map.  A box
of positive extent that contains no pixel centre (narrower than one map pixel)
covers the single pixel holding its midpoint, so that no real box vanishes at
a coarse stride.  A box of zero extent after clipping (``x1 == x0``, or wholly
outside the map) covers nothing: it contributes nothing to any loss and is
reported as empty.  Infinite coordinates are clipped like any other.  NaN
coordinates, ``x1 < x0`` or ``y1 < y0``, and batch indices or labels out of
range raise ``ValueError``.

The rule is implemented once for the CPU and CUDA kernels in
``csrc/include/boxloss/boxes/box_convention.h``; :func:`box_pixel_ranges` is
the same closed form for one box on the host (datasets, box crops, baselines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from boxloss import _checks

_FN = "pack_boxes"


class PackedBoxes(NamedTuple):
    boxes: torch.Tensor  # (K, 4)
    box_batch: torch.Tensor  # (K,) int64
    box_labels: torch.Tensor  # (K,) int64


def pack_boxes(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PackedBoxes:
    """Packs per-image boxes and labels into the (boxes, box_batch, box_labels) form.

    Args:
        boxes: one (K_b, 4) tensor (or nested sequence) of ``x0, y0, x1, y1`` per image;
            an image without boxes may give a (0, 4) tensor or an empty list.
        labels: one (K_b,) integer tensor (or sequence) of class channels per image.
        dtype: float dtype of the packed boxes.
        device: device of the result (default: that of the first tensor given, else CPU).

    Example:
        >>> packed = pack_boxes([torch.tensor([[4., 4., 20., 30.]]), torch.zeros(0, 4)],
        ...                     [torch.tensor([3]), torch.zeros(0, dtype=torch.long)])
        >>> packed.box_batch
        tensor([0])
    """
    if isinstance(boxes, torch.Tensor) or isinstance(labels, torch.Tensor):
        raise TypeError(f"{_FN}: boxes and labels must be sequences with one entry per image, got a tensor")
    if len(boxes) != len(labels):
        raise ValueError(f"{_FN}: boxes and labels must have one entry per image, got {len(boxes)} and {len(labels)}")
    if not dtype.is_floating_point:
        raise TypeError(f"{_FN}: dtype must be a floating-point dtype, got {dtype}")
    if device is None:
        device = next((t.device for t in list(boxes) + list(labels) if isinstance(t, torch.Tensor)), "cpu")
    packed_boxes, packed_batch, packed_labels = [], [], []
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        bx = torch.as_tensor(bx, dtype=dtype, device=device)
        lb = torch.as_tensor(lb, device=device)
        if lb.numel() == 0:
            lb = lb.to(torch.long)  # an empty list becomes a float tensor
        if bx.numel() == 0:
            bx = bx.reshape(0, 4)
        if bx.dim() != 2 or bx.shape[1] != 4:
            raise ValueError(f"{_FN}: boxes[{b}] must have shape (K, 4), got shape {tuple(bx.shape)}")
        if lb.dtype.is_floating_point or lb.dtype == torch.bool:
            raise TypeError(f"{_FN}: labels[{b}] must hold integers, got {lb.dtype}")
        lb = lb.reshape(-1).to(torch.long)
        if lb.shape[0] != bx.shape[0]:
            raise ValueError(f"{_FN}: labels[{b}] must have one label per box ({bx.shape[0]}), got {lb.shape[0]}")
        packed_boxes.append(bx)
        packed_labels.append(lb)
        packed_batch.append(torch.full((bx.shape[0],), b, dtype=torch.long, device=device))
    if not packed_boxes:
        return PackedBoxes(
            torch.zeros(0, 4, dtype=dtype, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
    return PackedBoxes(torch.cat(packed_boxes), torch.cat(packed_batch), torch.cat(packed_labels))


def check_packed_boxes(fn: str, boxes, box_batch, box_labels) -> None:
    """Type, shape and device checks of packed boxes (values are checked by the ops)."""
    _checks.check_tensor(fn, "boxes", boxes, dim=2, layout="(K, 4)")
    if boxes.shape[1] != 4:
        raise ValueError(f"{fn}: boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape {tuple(boxes.shape)}")
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"{fn}: boxes must be a floating-point tensor, got {boxes.dtype}")
    K = boxes.shape[0]
    for name, t in (("box_batch", box_batch), ("box_labels", box_labels)):
        _checks.check_tensor(fn, name, t, dim=1, layout="(K,)")
        if t.dtype != torch.long:
            raise TypeError(f"{fn}: {name} must be an int64 tensor, got {t.dtype}")
        if t.shape[0] != K:
            raise ValueError(f"{fn}: {name} must have shape (K,) = ({K},), got shape {tuple(t.shape)}")
        _checks.check_same(fn, name, t, "boxes", boxes, what="device")


def check_box_args(fn: str, probs, boxes, box_batch, box_labels, spatial_scale) -> float:
    """Shape, dtype and device checks of the packed boxes against probs (B, C, H, W).

    Value checks (NaN, x1 < x0, indices out of range) run inside the kernels.
    """
    _checks.check_tensor(fn, "probs", probs, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(fn, "probs", probs)
    if 0 in probs.shape:
        raise ValueError(f"{fn}: probs must be non-empty in every dimension, got shape {tuple(probs.shape)}")
    check_packed_boxes(fn, boxes, box_batch, box_labels)
    _checks.check_same(fn, "boxes", boxes, "probs", probs, what="device")
    return _checks.check_positive(fn, "spatial_scale", spatial_scale)


def clipped_box_areas(
    boxes: torch.Tensor, spatial_scale: float = 1.0, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """(K,) float64 areas, in map pixels, of the boxes clipped to the map, as the convention clips them.

    Map coordinates (``box * spatial_scale``) are clipped to ``[0, W] x [0, H]`` for ``size = (H, W)``, or to
    ``[0, inf)`` without a size.  A box with no extent after clipping (zero width, wholly off the map, or two
    infinite corners on one side) has area 0, so an infinite or huge box has at most the map's area and no
    ``inf * 0`` or ``inf - inf`` turns into NaN.  NaN coordinates give area 0 here; the ops reject them.
    """
    corners = boxes.to(torch.float64) * spatial_scale
    corners = corners.clamp_min(0.0)
    if size is not None:
        height, width = size
        corners = torch.minimum(corners, corners.new_tensor([width, height, width, height], dtype=torch.float64))
    x0, y0, x1, y1 = corners.unbind(1)
    w, h = x1 - x0, y1 - y0
    has_area = (x1 > x0) & (y1 > y0)
    return torch.where(has_area, w * h, torch.zeros_like(w))


def _covered_span(lo: float, hi: float, spatial_scale: float, size: int) -> tuple[int, int]:
    """[begin, end) of the pixels along one axis; (0, 0) when the box covers none."""
    a = min(max(lo * spatial_scale, 0.0), float(size))
    b = min(max(hi * spatial_scale, 0.0), float(size))
    if not b > a:
        return 0, 0
    # Pixel j is covered when a <= j + 0.5 < b.
    begin, end = math.ceil(a - 0.5), math.ceil(b - 0.5)
    if end > begin:
        return begin, end
    mid = min(math.floor(0.5 * (a + b)), size - 1)
    return mid, mid + 1


def box_pixel_ranges(
    box: Sequence[float], height: int, width: int, *, spatial_scale: float = 1.0
) -> tuple[int, int, int, int]:
    """The pixels one box ``(x0, y0, x1, y1)`` covers on a ``height`` x ``width`` map, by the convention above.

    Returns ``(row_begin, row_end, col_begin, col_end)`` (half-open), all 0 when
    the box covers nothing: the layout of the ``ranges`` the box ops return.
    NaN coordinates and ``x1 < x0`` or ``y1 < y0`` raise ``ValueError``.

    Example:
        >>> box_pixel_ranges((2, 1, 5, 3), 5, 7)
        (1, 3, 2, 5)
        >>> box_pixel_ranges((1.6, 0.4, 2.4, 9), 5, 7)  # narrower than a pixel: its midpoint's column
        (0, 5, 2, 3)
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if any(math.isnan(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box_pixel_ranges: box must not hold NaN, got {(x0, y0, x1, y1)}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box_pixel_ranges: box must have x1 >= x0 and y1 >= y0, got {(x0, y0, x1, y1)}")
    r0, r1 = _covered_span(y0, y1, spatial_scale, height)
    c0, c1 = _covered_span(x0, x1, spatial_scale, width)
    if r1 <= r0 or c1 <= c0:
        return 0, 0, 0, 0
    return r0, r1, c0, c1
