"""The box convention, re-derived by enumeration for the tests.

The kernels compute the covered pixels in closed form (csrc/include/boxloss/
boxes/box_convention.h); this module states the rule literally, one pixel at a
time, so that the two can be compared.

Rule: map coordinate = image coordinate * spatial_scale; along each axis a box
covers the map pixels j whose centre j + 0.5 lies in [lo, hi) after clipping
lo and hi to [0, size]; a box of positive clipped extent that holds no pixel
centre covers the single pixel containing its midpoint; a box of zero clipped
extent covers nothing.
"""

from __future__ import annotations

import math


def covered_range(lo: float, hi: float, spatial_scale: float, size: int) -> range:
    a = min(max(lo * spatial_scale, 0.0), float(size))
    b = min(max(hi * spatial_scale, 0.0), float(size))
    if not b > a:
        return range(0)
    centres = [j for j in range(size) if a <= j + 0.5 < b]
    if centres:
        return range(centres[0], centres[-1] + 1)
    mid = min(int(math.floor(0.5 * (a + b))), size - 1)
    return range(mid, mid + 1)


def box_pixel_ranges(box, spatial_scale: float, height: int, width: int) -> tuple[range, range]:
    """(rows, cols) a box (x0, y0, x1, y1) covers; both empty when either is."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rows = covered_range(y0, y1, spatial_scale, height)
    cols = covered_range(x0, x1, spatial_scale, width)
    if len(rows) == 0 or len(cols) == 0:
        return range(0), range(0)
    return rows, cols


def check_box(fn: str, k: int, box, batch_index: int, label: int, batch: int, channels: int) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    if any(math.isnan(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"{fn}: boxes must not hold NaN, got boxes[{k}] = {(x0, y0, x1, y1)}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{fn}: boxes must have x1 >= x0 and y1 >= y0, got boxes[{k}] = {(x0, y0, x1, y1)}")
    if not 0 <= batch_index < batch:
        raise ValueError(f"{fn}: box_batch must lie in [0, {batch}), got box_batch[{k}] = {batch_index}")
    if not 0 <= label < channels:
        raise ValueError(f"{fn}: box_labels must lie in [0, {channels}), got box_labels[{k}] = {label}")


def box_front_index_reference(boxes, box_batch, box_labels, priority, batch, num_classes, height, width, scale):
    """(front (B, H, W), ranges (K, 4)): the covering box with the smallest priority at each pixel
    (the lowest index among equal priorities), -1 where no box covers it; painted box by box."""
    import torch

    front = torch.full((batch, height, width), -1, dtype=torch.long)
    best = torch.zeros((batch, height, width), dtype=torch.long)
    ranges = []
    for k, (box, b, c, p) in enumerate(zip(boxes.tolist(), box_batch.tolist(), box_labels.tolist(), priority.tolist())):
        check_box("box_front_index", k, box, b, c, batch, num_classes)
        rows, cols = box_pixel_ranges(box, scale, height, width)
        ranges.append([rows.start, rows.stop, cols.start, cols.stop] if len(rows) else [0, 0, 0, 0])
        for y in rows:
            for x in cols:
                if front[b, y, x] < 0 or p < best[b, y, x]:
                    front[b, y, x], best[b, y, x] = k, p
    return front.to(boxes.device), torch.tensor(ranges, dtype=torch.long, device=boxes.device).reshape(-1, 4)


def clipped_box_area(box, spatial_scale: float, height: int, width: int) -> float:
    """Area, in map pixels, of the part of a box (x0, y0, x1, y1) inside the height x width map: the box's
    corners are clipped to the map as the covered pixels are, so a box with infinite corners has at most the
    map's area; 0 when the clipped box has no extent."""
    x0, y0, x1, y1 = (float(v) for v in box)

    def clip(v: float, size: int) -> float:
        return min(max(v * spatial_scale, 0.0), float(size))

    w = clip(x1, width) - clip(x0, width)
    h = clip(y1, height) - clip(y0, height)
    return w * h if w > 0 and h > 0 else 0.0


def boxes_to_labels_reference(boxes, box_batch, box_labels, batch, height, width, spatial_scale, order):
    """(B, H, W) int64 label map painted box by box: each pixel takes the label of the covering box in front
    (``"smaller-front"``: the smallest clipped area; ``"larger-front"``: the largest; ``"later-front"``: the
    highest index; equal keys: the lower index), 0 where no box covers it."""
    import torch

    keys = []
    for k, box in enumerate(boxes.tolist()):
        area = clipped_box_area(box, spatial_scale, height, width)
        keys.append({"smaller-front": area, "larger-front": -area, "later-front": -k}[order])
    out = torch.zeros((batch, height, width), dtype=torch.long)
    best = {}
    for k, (box, b, c) in enumerate(zip(boxes.tolist(), box_batch.tolist(), box_labels.tolist())):
        rows, cols = box_pixel_ranges(box, spatial_scale, height, width)
        for y in rows:
            for x in cols:
                if (b, y, x) not in best or keys[k] < best[(b, y, x)]:
                    best[(b, y, x)] = keys[k]
                    out[b, y, x] = c
    return out
