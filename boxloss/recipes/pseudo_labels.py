r"""Pseudo ground truth from per-box foreground masks, with conflict resolution.

Rules of Box to Tag and Back (Ji & Veksler, BMVC 2021, Sec. 4.3): pixels in no
box are background (0); a pixel segmented as object in one box, or in several
boxes of the same class, takes that class; *overlap* pixels (object in boxes
of two or more classes) are resolved by the strategy:

- ``"overlap-small"``: the class of the smallest claiming box (ties: the lower box index);
- ``"overlap-void"``: void (255);
- ``"overlap-back-void"``: void, and so is every pixel labelled background by
  any box that covers it;
- ``"overlap-rate"`` (LPG, Xie et al., Eq. 7): the class with the higher
  overlapping rate = overlapping area / predicted semantic area.  The
  overlapping area of a region is shared by its classes, so this is the class
  with the smallest predicted semantic area (pixels claimed by that class in
  the image); ties go to the lower class.
"""

from __future__ import annotations

import numpy as np
import torch

from boxloss import _checks
from boxloss.ops.box_masks import _priority, box_front_index, check_box_values
from boxloss.ops.boxes import check_packed_boxes

STRATEGIES = ("overlap-small", "overlap-void", "overlap-back-void", "overlap-rate")
VOID = 255


def _in_box(ranges: torch.Tensor, height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height, device=ranges.device)
    cols = torch.arange(width, device=ranges.device)
    r = (rows >= ranges[:, 0:1]) & (rows < ranges[:, 1:2])
    c = (cols >= ranges[:, 2:3]) & (cols < ranges[:, 3:4])
    return r[:, :, None] & c[:, None, :]


def merge_box_masks(
    masks,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    size: tuple[int, int, int],
    *,
    strategy: str = "overlap-void",
    spatial_scale: float = 1.0,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Merges per-box foreground masks into a (B, H, W) int64 label map (void 255).

    Args:
        masks: (K, H, W) bool (tensor or numpy), box k's object pixels in map
            coordinates; pixels outside the box are ignored (the box convention of
            :mod:`boxloss.ops.boxes` decides which pixels a box covers).
        boxes, box_batch, box_labels: packed boxes; labels in [1, L].
        size: (B, H, W) of the result.
        strategy: one of ``"overlap-small"``, ``"overlap-void"``, ``"overlap-back-void"``,
            ``"overlap-rate"``.
        spatial_scale: map coordinate = box coordinate x spatial_scale.
        num_classes: L (default: the largest label).

    Example:
        >>> masks = torch.ones(2, 4, 4, dtype=torch.bool)
        >>> merge_box_masks(masks, torch.tensor([[0., 0., 4., 4.], [1., 1., 3., 3.]]), torch.tensor([0, 0]),
        ...                 torch.tensor([1, 2]), (1, 4, 4), strategy="overlap-small")[0, 1]  # the smaller box wins
        tensor([1, 2, 2, 1])
    """
    fn = "merge_box_masks"
    _checks.check_choice(fn, "strategy", strategy, STRATEGIES)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{fn}: size must be (B, H, W) of positive ints, got {size!r}")
    B, H, W = size
    check_packed_boxes(fn, boxes, box_batch, box_labels)
    spatial_scale = _checks.check_positive(fn, "spatial_scale", spatial_scale)
    if num_classes is not None:
        _checks.check_int(fn, "num_classes", num_classes, minimum=1)
    if not isinstance(masks, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"{fn}: masks must be a bool tensor or numpy array of shape (K, H, W), got {type(masks).__name__}"
        )
    masks = torch.as_tensor(masks, device=boxes.device)
    K = boxes.shape[0]
    if masks.dtype != torch.bool:
        raise TypeError(f"{fn}: masks must be bool, got {masks.dtype}")
    if masks.shape != (K, H, W):
        raise ValueError(f"{fn}: masks must have shape (K, H, W) = {(K, H, W)}, got {tuple(masks.shape)}")
    if K == 0:
        return torch.zeros(B, H, W, dtype=torch.long, device=boxes.device)
    check_box_values(fn, boxes, box_batch, box_labels, B, num_classes)
    L = int(box_labels.max()) if num_classes is None else num_classes
    C = L + 1
    priority = _priority(boxes, "smaller-front", spatial_scale, (H, W))
    _, ranges = box_front_index(boxes, box_batch, box_labels, priority, B, C, H, W, spatial_scale, fn=fn)
    inside = _in_box(ranges, H, W)
    obj = masks & inside
    background_in_box = (inside & ~masks).reshape(K, -1)
    flat = box_batch * C + box_labels
    claims = torch.zeros(B * C, H * W, dtype=torch.int32, device=boxes.device)
    claims.index_add_(0, flat, obj.reshape(K, -1).to(torch.int32))
    claim = (claims > 0).view(B, C, H * W)
    n_claim = claim.sum(1)
    single = claim.to(torch.int8).argmax(1)
    label = torch.where(n_claim == 1, single, torch.zeros_like(single))
    overlap = n_claim >= 2
    if strategy == "overlap-small":
        # The rank of each box in front-to-back order (a stable sort keeps ties in index order); K means none.
        front_to_back = torch.sort(priority, stable=True).indices
        rank = torch.empty_like(priority)
        rank[front_to_back] = torch.arange(K, device=boxes.device)
        keys = torch.where(obj.reshape(K, -1), rank[:, None], torch.full_like(rank[:, None], K))
        best = torch.full((B, H * W), K, dtype=torch.long, device=boxes.device)
        best.scatter_reduce_(0, box_batch[:, None].expand(K, H * W), keys, reduce="amin")
        front = front_to_back[best.clamp(max=K - 1)]
        label = torch.where(overlap, box_labels[front], label)
    elif strategy == "overlap-rate":
        area = claim.sum(2, keepdim=True)  # (B, C, 1) predicted semantic area per class
        cost = torch.where(claim, area.expand_as(claim), torch.full_like(claim, H * W + 1, dtype=torch.long))
        label = torch.where(overlap, cost.argmin(1), label)
    else:
        label = torch.where(overlap, torch.full_like(label, VOID), label)
    if strategy == "overlap-back-void":
        counts = torch.zeros(B, H * W, dtype=torch.int32, device=boxes.device)
        counts.index_add_(0, box_batch, background_in_box.to(torch.int32))
        label = torch.where(counts > 0, torch.full_like(label, VOID), label)
    return label.view(B, H, W)
