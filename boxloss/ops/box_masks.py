r"""Box tensors: rasterised boxes in the forms the box-supervised losses use.

- ``"onehot"``: Box2Seg's box-segmentation tensor B (Kulharia et al., ECCV 2020,
  Sec. 3.1), (B, L+1, H, W) with a background channel 0: each pixel is 1 in
  the channel of the box in front (by default the smaller box, "assuming that
  the smaller box is in the front"), or in channel 0 outside every box;
- ``"labels"``: the same as a (B, H, W) int64 label map (0 outside boxes);
- ``"union"``: (B, L+1, H, W) bool, channel c true wherever any box of class c
  lies (LPG's per-class box masks :math:`y^{b_i}`, Xie et al. Eq. 7); channel 0
  is true outside every box.

Which pixels a box covers is the convention of :mod:`boxloss.ops.boxes` (the
host/device header ``boxloss/boxes/box_convention.h``); the front box of
every pixel is found by the ``boxloss::box_front_index`` op (CPU and CUDA).
"""

from __future__ import annotations

import torch

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded
from boxloss.ops.boxes import check_box_args, check_packed_boxes, clipped_box_areas

ORDERS = ("smaller-front", "larger-front", "later-front")
FORMS = ("onehot", "labels", "union")


def box_priority(
    boxes: torch.Tensor,
    order: str = "smaller-front",
    spatial_scale: float = 1.0,
    *,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(K,) int64 priorities of the boxes, the smallest in front; ties go to the lower box index.

    ``"smaller-front"`` and ``"larger-front"`` rank the boxes by their area clipped to the map
    (:func:`boxloss.ops.boxes.clipped_box_areas`): with ``size = (H, W)`` a box with infinite or huge corners
    ranks as the part of the map it covers, never in front of a small box inside it; without ``size`` the map is
    unbounded (boxes are clipped at 0 only).  ``"later-front"`` puts the higher index in front.

    The priority of an area is the bit pattern of the float64 area read as int64, which orders non-negative
    doubles as their values, so equal areas tie exactly and no area, however large, overflows.  NaN coordinates
    raise ``ValueError`` (which reads the boxes on the host: one synchronisation on CUDA).

    Example:
        >>> boxes = torch.tensor([[0., 0., float("inf"), float("inf")], [2., 2., 5., 5.]])
        >>> box_priority(boxes, size=(8, 8)).argsort().tolist()  # the 3 x 3 box before the 8 x 8 map
        [1, 0]
    """
    fn = "box_priority"
    _checks.check_choice(fn, "order", order, ORDERS)
    _checks.check_tensor(fn, "boxes", boxes, dim=2, layout="(K, 4)")
    if boxes.shape[1] != 4:
        raise ValueError(f"{fn}: boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape {tuple(boxes.shape)}")
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"{fn}: boxes must be a floating-point tensor, got {boxes.dtype}")
    spatial_scale = _checks.check_positive(fn, "spatial_scale", spatial_scale)
    if size is not None:
        size = _map_size(fn, size)
    nan = boxes.isnan().any(1)
    if bool(nan.any()):
        k = int(nan.nonzero()[0, 0])
        raise ValueError(f"{fn}: boxes must not hold NaN, got boxes[{k}] = {tuple(boxes[k].tolist())}")
    return _priority(boxes, order, spatial_scale, size)


def _map_size(fn: str, size) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{fn}: size must be (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _priority(boxes: torch.Tensor, order: str, spatial_scale: float, size: tuple[int, int] | None) -> torch.Tensor:
    """:func:`box_priority` without the argument checks (the ops check the boxes)."""
    if order == "later-front":
        return -torch.arange(boxes.shape[0], device=boxes.device)
    # A non-negative double's bits, read as int64, order as its value: exact areas as integers.
    area = clipped_box_areas(boxes, spatial_scale, size).view(torch.long)
    return area if order == "smaller-front" else -area


def boxes_to_masks(
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    size: tuple[int, int, int] | tuple[int, int],
    num_classes: int,
    *,
    batch_size: int | None = None,
    spatial_scale: float = 1.0,
    order: str = "smaller-front",
    form: str = "onehot",
) -> torch.Tensor:
    """Rasterises packed boxes (labels 1..L) onto (B, H, W) maps.

    Args:
        boxes, box_batch, box_labels: packed boxes (:mod:`boxloss.ops.boxes`); labels
            are class channels in [1, num_classes]; 0 is the background.
        size: (H, W) of the map, or (B, H, W).
        num_classes: L, the number of object classes (the result has L + 1 channels).
        batch_size: B when ``size`` is (H, W) (default: 1 + the largest box_batch,
            which reads a value from the device).
        spatial_scale: map coordinate = box coordinate x spatial_scale.
        order: which of overlapping boxes is in front: ``"smaller-front"`` (Box2Seg),
            ``"larger-front"`` or ``"later-front"`` (painter's order); ties go to the
            lower box index.
        form: ``"onehot"`` (B, L+1, H, W) float, ``"labels"`` (B, H, W) int64, or
            ``"union"`` (B, L+1, H, W) bool.

    Example:
        >>> B = boxes_to_masks(torch.tensor([[0., 0., 4., 4.], [2., 2., 3., 3.]]), torch.tensor([0, 0]),
        ...                    torch.tensor([1, 2]), (6, 6), num_classes=2)
        >>> B.shape, B[0, 2, 2, 2].item()
        (torch.Size([1, 3, 6, 6]), 1.0)
    """
    fn = "boxes_to_masks"
    _checks.check_choice(fn, "order", order, ORDERS)
    _checks.check_choice(fn, "form", form, FORMS)
    num_classes = _checks.check_int(fn, "num_classes", num_classes, minimum=1)
    if (
        not isinstance(size, (tuple, list))
        or len(size) not in (2, 3)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{fn}: size must be (H, W) or (B, H, W) of positive ints, got {size!r}")
    check_packed_boxes(fn, boxes, box_batch, box_labels)
    if len(size) == 3:
        batch, height, width = size
    else:
        height, width = size
        batch = batch_size if batch_size is not None else (int(box_batch.max()) + 1 if box_batch.numel() else 1)
    _checks.check_int(fn, "batch_size", batch, minimum=1)
    probe = boxes.new_empty((batch, num_classes + 1, 1, 1))
    spatial_scale = check_box_args(fn, probe, boxes, box_batch, box_labels, spatial_scale)
    check_box_values(fn, boxes, box_batch, box_labels, batch, num_classes)
    priority = _priority(boxes, order, spatial_scale, (height, width))
    # Label 0 is given to the op as -1, out of its range, so a compiled graph (which skips the check above) raises.
    op_labels = torch.where(box_labels > 0, box_labels, torch.full_like(box_labels, -1))
    front, ranges = box_front_index(
        boxes, box_batch, op_labels, priority, batch, num_classes + 1, height, width, spatial_scale, fn=fn
    )
    if form == "union":
        return class_union(ranges, box_batch, box_labels, batch, num_classes + 1, height, width)
    # A zero label in front of the labels lets index -1 (no box) read the background.
    padded = torch.cat([box_labels.new_zeros(1), box_labels])
    labels = padded[front + 1]
    if form == "labels":
        return labels
    return torch.nn.functional.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).to(torch.float32)


def check_box_values(fn: str, boxes, box_batch, box_labels, batch: int, num_classes: int | None) -> None:
    """Value checks of packed boxes, naming ``fn`` and the first bad box: NaN corners, ``x1 < x0`` or ``y1 < y0``,
    ``box_batch`` outside [0, batch), and labels that are not object classes 1..L (a box labelled 0, the
    background, would paint background inside another box).

    The op checks the same values (labels in [0, L]) but names itself; this check reads one flag per box on the host
    (on CUDA one synchronisation, beside the one the op makes to report bad boxes) and is skipped while
    torch.compile traces, where the op's checks raise at run time instead (boxes_to_masks hands it label 0 as -1,
    out of its range)."""
    if torch.compiler.is_compiling() or boxes.shape[0] == 0:
        return
    nan = boxes.isnan().any(1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    batch_bad = (box_batch < 0) | (box_batch >= batch)
    label_bad = box_labels < 1
    if num_classes is not None:
        label_bad |= box_labels > num_classes
    bad = nan | inverted | batch_bad | label_bad
    if not bool(bad.any()):
        return
    k = int(bad.nonzero()[0, 0])
    if bool(nan[k]) or bool(inverted[k]):
        what = "not hold NaN" if bool(nan[k]) else "have x1 >= x0 and y1 >= y0"
        raise ValueError(f"{fn}: boxes must {what}, got boxes[{k}] = {tuple(boxes[k].tolist())}")
    if bool(batch_bad[k]):
        raise ValueError(f"{fn}: box_batch must lie in [0, {batch}), got box_batch[{k}] = {int(box_batch[k])}")
    top = "L" if num_classes is None else str(num_classes)
    raise ValueError(
        f"{fn}: box_labels must be object classes in [1, {top}] (0 is the background), "
        f"got box_labels[{k}] = {int(box_labels[k])}"
    )


def box_front_index(
    boxes,
    box_batch,
    box_labels,
    priority,
    batch: int,
    channels: int,
    height: int,
    width: int,
    spatial_scale: float,
    *,
    fn: str = "box_front_index",
):
    """(front (B, H, W) int64, ranges (K, 4) int64): at each pixel the index of the covering box with the
    smallest ``priority`` (ties: the lower index), -1 where no box covers it; ``ranges`` holds each box's
    covered ``row_begin, row_end, col_begin, col_end``.  The arguments are checked by the caller."""
    if extension_loaded():
        return torch.ops.boxloss.box_front_index.default(
            boxes, box_batch, box_labels, priority, batch, channels, height, width, spatial_scale
        )
    return _fallback.box_front_index(
        fn, boxes, box_batch, box_labels, priority, batch, channels, height, width, spatial_scale
    )


def class_union(ranges, box_batch, box_labels, batch, channels, height, width) -> torch.Tensor:
    """(B, channels, H, W) bool: covered by any box of that class; channel 0 is
    true outside every box.  A 2-D difference array and two cumulative sums,
    so no tensor of size (K, H, W) is formed."""
    delta = torch.zeros(batch * channels, height + 1, width + 1, dtype=torch.long, device=ranges.device)
    flat = box_batch * channels + box_labels
    nonempty = (ranges[:, 1] > ranges[:, 0]) & (ranges[:, 3] > ranges[:, 2])
    ones = nonempty.to(torch.long)
    for rows, cols, sign in ((0, 2, 1), (1, 3, 1), (0, 3, -1), (1, 2, -1)):
        delta.index_put_((flat, ranges[:, rows], ranges[:, cols]), sign * ones, accumulate=True)
    covered = delta.cumsum(1).cumsum(2)[:, :height, :width] > 0
    covered = covered.view(batch, channels, height, width)
    covered[:, 0] = ~covered[:, 1:].any(1)
    return covered


def _register() -> None:
    @torch.library.register_fake("boxloss::box_front_index")
    def _box_front_index_fake(boxes, box_batch, box_labels, priority, batch, num_classes, height, width, spatial_scale):
        K = boxes.shape[0]
        return (boxes.new_empty((batch, height, width), dtype=torch.long), boxes.new_empty((K, 4), dtype=torch.long))


if extension_loaded():
    _register()
