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
from boxloss.ops.boxes import check_box_args

ORDERS = ("smaller-front", "larger-front", "later-front")
FORMS = ("onehot", "labels", "union")


def box_priority(boxes: torch.Tensor, order: str = "smaller-front", spatial_scale: float = 1.0) -> torch.Tensor:
    """(K,) int64 priorities of the boxes, smaller in front; ties go to the lower box index."""
    _checks.check_choice("box_priority", "order", order, ORDERS)
    K = boxes.shape[0]
    if order == "later-front":
        return -torch.arange(K, device=boxes.device)
    # Areas in (1/64 of a) map pixel, as integers, so ties are exact.
    wh = ((boxes[:, 2:] - boxes[:, :2]) * spatial_scale).to(torch.float64).clamp(0, 2.0**40)
    area = torch.round(wh[:, 0] * wh[:, 1] * 64).to(torch.long)
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
    if len(size) == 3:
        batch, height, width = size
    else:
        height, width = size
        batch = batch_size if batch_size is not None else (int(box_batch.max()) + 1 if box_batch.numel() else 1)
    _checks.check_int(fn, "batch_size", batch, minimum=1)
    if not isinstance(boxes, torch.Tensor) or not boxes.dtype.is_floating_point:
        raise TypeError(
            f"{fn}: boxes must be a floating-point tensor, got "
            f"{boxes.dtype if isinstance(boxes, torch.Tensor) else type(boxes).__name__}"
        )
    probe = boxes.new_empty((batch, num_classes + 1, 1, 1))
    spatial_scale = check_box_args(fn, probe, boxes, box_batch, box_labels, spatial_scale)
    priority = box_priority(boxes, order, spatial_scale)
    front, ranges = box_front_index(
        boxes, box_batch, box_labels, priority, batch, num_classes + 1, height, width, spatial_scale, fn=fn
    )
    if form == "union":
        return class_union(ranges, box_batch, box_labels, batch, num_classes + 1, height, width)
    # A zero label in front of the labels lets index -1 (no box) read the background.
    padded = torch.cat([box_labels.new_zeros(1), box_labels])
    labels = padded[front + 1]
    if form == "labels":
        return labels
    return torch.nn.functional.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).to(torch.float32)


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
