r"""Tight-box priors on one fused primitive: the row and column maxima of each
box's class channel.

A bounding box is tight: the object touches (nearly) every row or every column
it spans.  :func:`boxloss.box_row_col_max` computes, for many boxes of many
images in one kernel call, the maximum of the box's class channel along each
covered row and column; :func:`tight_box_loss` (Box to Tag and Back, Eq. 6),
:func:`mil_box_loss` (Hsu et al., NeurIPS 2019) and :func:`projection_loss`
(BoxInst) are built on it.  Boxes follow the convention of :mod:`boxloss.ops.boxes`.
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks
from boxloss.losses.region_priors import _foreground, _pixel_mask
from boxloss.ops.boxes import check_box_args
from boxloss.ops.row_col_max import covered, row_col_max_dense

TIGHT_MODES = ("either", "both")
NEGATIVES = ("all", "present")


def _probability_maxima(fn: str, *maxima: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The row and column maxima a box loss reads, checked to be probabilities.

    The losses read ``probs`` only through these maxima, so a value out of
    [0, 1] that matters (Inf, or a logit above 1 or a row of logits below 0)
    shows in them; NaN inside a box is already an error of the op.  In eager
    mode a bad maximum raises ValueError; a compiled graph cannot branch on
    values, so there the maxima are clamped to [0, 1], which keeps the loss
    finite.  The clamp is a select, the identity with its gradient on [0, 1]
    including the ends (``torch.clamp`` gives no gradient at a maximum of
    exactly 1, a confident pixel).
    """
    _checks.check_values(fn, probs=(torch.cat([m.reshape(-1) for m in maxima]), _checks.PROBABILITIES))
    return tuple(torch.where(m > 1, 1.0, torch.where(m < 0, 0.0, m)) for m in maxima)


def _reduce_boxes(per_box: torch.Tensor, nonempty: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean': over the non-empty boxes (0, with a gradient, when there are none)."""
    if reduction == "none":
        return per_box
    if reduction == "sum":
        return per_box.sum()
    return per_box.sum() / nonempty.sum().clamp_min(1).to(per_box.dtype)


def tight_box_loss(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    *,
    spatial_scale: float = 1.0,
    mode: str = "either",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Tight-box prior of Box to Tag and Back (Ji & Veksler, BMVC 2021), Eq. 6 second term.

    For box ``k`` with covered rows ``R_k`` (``r`` of them) and columns
    ``C_k`` (``c`` of them) of its class channel ``x``:

    .. math::
        \bar r_k = \frac{1}{r} \sum_{row \in R_k} \max_{p \in row} x_p, \qquad
        \bar c_k = \frac{1}{c} \sum_{col \in C_k} \max_{p \in col} x_p

    ``mode="either"`` (the paper: the object fills the box's width or its height):
    :math:`\ell_k = (\max\{\bar r_k, \bar c_k\} - 1)^2`;
    ``mode="both"``: :math:`\ell_k = \tfrac12[(\bar r_k - 1)^2 + (\bar c_k - 1)^2]`.

    Reduction: ``"mean"`` over the boxes that cover at least one pixel (0 when
    none does), ``"sum"``, or ``"none"`` for the (K,) per-box losses (0 for an
    empty box).

    Shape:
        probs (B, C, H, W) probabilities; boxes (K, 4); box_batch, box_labels (K,).

    Example:
        >>> probs = torch.rand(2, 21, 64, 64, requires_grad=True)
        >>> boxes = torch.tensor([[8., 8., 40., 30.]])
        >>> loss = tight_box_loss(probs, boxes, torch.tensor([0]), torch.tensor([3]))
        >>> loss.backward()
    """
    fn = "tight_box_loss"
    spatial_scale = check_box_args(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    _checks.check_choice(fn, "mode", mode, TIGHT_MODES)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    row_max, col_max, ranges = row_col_max_dense(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    row_max, col_max = _probability_maxima(fn, row_max, col_max)
    heights = (ranges[:, 1] - ranges[:, 0]).to(probs.dtype)
    widths = (ranges[:, 3] - ranges[:, 2]).to(probs.dtype)
    nonempty = (heights > 0) & (widths > 0)
    mean_row_max = row_max.sum(1) / heights.clamp_min(1)
    mean_col_max = col_max.sum(1) / widths.clamp_min(1)
    if mode == "either":
        per_box = (torch.maximum(mean_row_max, mean_col_max) - 1) ** 2
    else:
        per_box = 0.5 * ((mean_row_max - 1) ** 2 + (mean_col_max - 1) ** 2)
    per_box = torch.where(nonempty, per_box, torch.zeros_like(per_box))
    return _reduce_boxes(per_box, nonempty, reduction)


def _whole_image_maxima(fn, probs, boxes, box_batch, box_labels, spatial_scale):
    """Row/column maxima of the real boxes and of every (image, channel) plane in one call.

    Each plane is a box (0, 0, inf, inf), which the convention clips to the map.
    Returns (box_row_max (K, H), box_col_max (K, W), ranges (K, 4),
    plane_row_max (B, C, H), plane_col_max (B, C, W)).
    """
    B, C, H, W = probs.shape
    K = boxes.shape[0]
    planes = B * C
    whole = torch.cat([boxes.new_zeros(planes, 2), boxes.new_full((planes, 2), float("inf"))], dim=1)
    plane_index = torch.arange(planes, device=probs.device)
    row_max, col_max, ranges = row_col_max_dense(
        fn,
        probs,
        torch.cat([boxes, whole]),
        torch.cat([box_batch, plane_index // C]),
        torch.cat([box_labels, plane_index % C]),
        spatial_scale,
    )
    return (
        row_max[:K],
        col_max[:K],
        ranges[:K],
        row_max[K:].view(B, C, H),
        col_max[K:].view(B, C, W),
    )


def _class_coverage(ranges, box_batch, box_labels, B, C, size, begin):
    """(B, C, size) bool: covered by at least one box of that image and class."""
    flat = box_batch * C + box_labels
    delta = ranges.new_zeros(B * C, size + 1)
    ones = torch.ones_like(flat)
    delta.index_put_((flat, ranges[:, begin]), ones, accumulate=True)
    delta.index_put_((flat, ranges[:, begin + 1]), -ones, accumulate=True)
    return (delta.cumsum(1)[:, :size] > 0).view(B, C, size)


def _per_image_sum(values: torch.Tensor, box_batch: torch.Tensor, B: int) -> torch.Tensor:
    return values.new_zeros(B).index_add(0, box_batch, values)


def mil_box_loss(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    *,
    spatial_scale: float = 1.0,
    background_channel: int | None = 0,
    negatives: str = "all",
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Multiple-instance box loss of Hsu et al. (BBTP, NeurIPS 2019) for semantic maps.

    Bags are rows and columns.  Each row and column a box of class ``c`` covers
    is a positive bag (its maximum inside the box should be 1); each row and
    column of the image that no box of class ``c`` covers is a negative bag of
    class ``c`` (its maximum over the whole image row or column should be 0).
    Per image:

    .. math::
        L_b = \frac{1}{|\mathcal{B}^+_b| + |\mathcal{B}^-_b|}\Big(
        -\sum_{\beta \in \mathcal{B}^+_b} \log \max_{p \in \beta} x_p
        -\sum_{\beta \in \mathcal{B}^-_b} \log\big(1 - \max_{p \in \beta} x_p\big)\Big)

    with logs of values clamped below at ``eps`` (no Inf).  Negative bags are
    taken for every channel except ``background_channel`` (None: every
    channel); ``negatives="present"`` keeps only classes with a box in the
    image.  Reduction over images: ``"mean"``, ``"sum"``, ``"none"`` (B,); an
    image without bags contributes 0.

    Shape:
        probs (B, C, H, W) probabilities; boxes (K, 4); box_batch, box_labels (K,).

    Example:
        >>> probs = torch.rand(2, 21, 64, 64).softmax(1).requires_grad_()
        >>> loss = mil_box_loss(probs, torch.tensor([[8., 8., 40., 30.]]), torch.tensor([0]),
        ...                     torch.tensor([3]))
    """
    fn = "mil_box_loss"
    spatial_scale = check_box_args(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    _checks.check_choice(fn, "negatives", negatives, NEGATIVES)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    eps = _checks.check_positive(fn, "eps", eps)
    B, C, H, W = probs.shape
    if background_channel is not None:
        if isinstance(background_channel, bool) or not isinstance(background_channel, int):
            raise TypeError(f"{fn}: background_channel must be an int or None, got {background_channel!r}")
        if not 0 <= background_channel < C:
            raise ValueError(f"{fn}: background_channel must lie in [0, {C}) or be None, got {background_channel}")
    box_rows, box_cols, ranges, plane_rows, plane_cols = _whole_image_maxima(
        fn, probs, boxes, box_batch, box_labels, spatial_scale
    )
    box_rows, box_cols, plane_rows, plane_cols = _probability_maxima(fn, box_rows, box_cols, plane_rows, plane_cols)
    row_in_box = covered(ranges, H, 0)
    col_in_box = covered(ranges, W, 2)
    positive = (-torch.log(box_rows.clamp_min(eps)) * row_in_box).sum(1) + (
        -torch.log(box_cols.clamp_min(eps)) * col_in_box
    ).sum(1)
    positive_count = row_in_box.sum(1) + col_in_box.sum(1)

    covered_rows = _class_coverage(ranges, box_batch, box_labels, B, C, H, 0)
    covered_cols = _class_coverage(ranges, box_batch, box_labels, B, C, W, 2)
    channel_on = torch.ones(B, C, dtype=torch.bool, device=probs.device)
    if background_channel is not None:
        channel_on[:, background_channel] = False
    if negatives == "present":
        channel_on = channel_on & covered_rows.any(2)
    free_rows = ~covered_rows & channel_on[:, :, None]
    free_cols = ~covered_cols & channel_on[:, :, None]
    negative = (-torch.log((1 - plane_rows).clamp_min(eps)) * free_rows).sum((1, 2)) + (
        -torch.log((1 - plane_cols).clamp_min(eps)) * free_cols
    ).sum((1, 2))
    negative_count = free_rows.sum((1, 2)) + free_cols.sum((1, 2))

    total = _per_image_sum(positive, box_batch, B) + negative
    count = _per_image_sum(positive_count.to(probs.dtype), box_batch, B) + negative_count.to(probs.dtype)
    per_image = total / count.clamp_min(1)
    return _checks.reduce_per_image(per_image, reduction)


def projection_loss(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    *,
    spatial_scale: float = 1.0,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Projection loss of BoxInst (Tian et al., CVPR 2021) for semantic maps.

    For each image ``b`` and each class ``c`` with at least one non-empty box
    there, with ``P`` its channel and ``M`` the union of its box masks:

    .. math::
        \ell_{bc} = D(\max_y P, \max_y M) + D(\max_x P, \max_x M), \qquad
        D(p, t) = 1 - \frac{2 \sum_i p_i t_i}{\sum_i p_i^2 + \sum_i t_i^2 + \epsilon}

    The image loss is the mean of ``l_bc`` over its classes with a box (0 for an
    image without any).  Reduction over images: ``"mean"``, ``"sum"``, ``"none"`` (B,).

    Shape:
        probs (B, C, H, W) probabilities; boxes (K, 4); box_batch, box_labels (K,).
    """
    fn = "projection_loss"
    spatial_scale = check_box_args(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    eps = _checks.check_positive(fn, "eps", eps)
    B, C, H, W = probs.shape
    _, _, ranges, plane_rows, plane_cols = _whole_image_maxima(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    plane_rows, plane_cols = _probability_maxima(fn, plane_rows, plane_cols)
    target_rows = _class_coverage(ranges, box_batch, box_labels, B, C, H, 0).to(probs.dtype)
    target_cols = _class_coverage(ranges, box_batch, box_labels, B, C, W, 2).to(probs.dtype)

    def dice(p, t):
        return 1 - 2 * (p * t).sum(-1) / ((p * p).sum(-1) + (t * t).sum(-1) + eps)

    per_class = dice(plane_rows, target_rows) + dice(plane_cols, target_cols)
    present = (target_rows.sum(-1) > 0).to(probs.dtype)
    per_image = (per_class * present).sum(1) / present.sum(1).clamp_min(1)
    return _checks.reduce_per_image(per_image, reduction)


def border_background_loss(
    fg_probs: torch.Tensor,
    border_mask: torch.Tensor,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Border cross-entropy of Box to Tag and Back, Eq. 6 first term.

    .. math::
        L_b = -\frac{1}{|\mathcal{B}_b|} \sum_{p \in \mathcal{B}_b} \log \max(1 - x_p, \epsilon)

    The border ``B`` (pixels known to be background, e.g. the 3-pixel margin a
    box crop takes from outside its box) is a bool mask; an image with an empty
    border contributes 0.  Clamping at ``eps`` keeps the loss finite at ``x = 1``.

    Shape:
        fg_probs (B, H, W) or (B, 1, H, W) object probabilities; border_mask
        (B, H, W) or (H, W) bool.  Reduction over images: ``"mean"``, ``"sum"``,
        ``"none"`` (B,).
    """
    fn = "border_background_loss"
    x = _foreground(fn, "fg_probs", fg_probs)
    mask = _pixel_mask(fn, "border_mask", border_mask, x)
    eps = _checks.check_positive(fn, "eps", eps)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    m = mask.to(x.dtype)
    total = (-torch.log((1 - x).clamp_min(eps)) * m).sum((1, 2))
    per_image = total / m.sum((1, 2)).clamp_min(1)
    return _checks.reduce_per_image(per_image, reduction)


class TightBoxLoss(nn.Module):
    """Module form of :func:`tight_box_loss`."""

    def __init__(self, *, spatial_scale: float = 1.0, mode: str = "either", reduction: str = "mean") -> None:
        super().__init__()
        self.spatial_scale = _checks.check_positive("TightBoxLoss", "spatial_scale", spatial_scale)
        _checks.check_choice("TightBoxLoss", "mode", mode, TIGHT_MODES)
        _checks.check_choice("TightBoxLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.mode, self.reduction = mode, reduction

    def forward(self, probs, boxes, box_batch, box_labels):
        return tight_box_loss(
            probs,
            boxes,
            box_batch,
            box_labels,
            spatial_scale=self.spatial_scale,
            mode=self.mode,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"spatial_scale={self.spatial_scale}, mode={self.mode!r}, reduction={self.reduction!r}"


class MILBoxLoss(nn.Module):
    """Module form of :func:`mil_box_loss`."""

    def __init__(
        self,
        *,
        spatial_scale: float = 1.0,
        background_channel: int | None = 0,
        negatives: str = "all",
        eps: float = 1e-6,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.spatial_scale = _checks.check_positive("MILBoxLoss", "spatial_scale", spatial_scale)
        _checks.check_choice("MILBoxLoss", "negatives", negatives, NEGATIVES)
        _checks.check_choice("MILBoxLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.eps = _checks.check_positive("MILBoxLoss", "eps", eps)
        self.background_channel, self.negatives, self.reduction = background_channel, negatives, reduction

    def forward(self, probs, boxes, box_batch, box_labels):
        return mil_box_loss(
            probs,
            boxes,
            box_batch,
            box_labels,
            spatial_scale=self.spatial_scale,
            background_channel=self.background_channel,
            negatives=self.negatives,
            eps=self.eps,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"spatial_scale={self.spatial_scale}, background_channel={self.background_channel}, "
            f"negatives={self.negatives!r}, reduction={self.reduction!r}"
        )


class ProjectionLoss(nn.Module):
    """Module form of :func:`projection_loss`."""

    def __init__(self, *, spatial_scale: float = 1.0, eps: float = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        self.spatial_scale = _checks.check_positive("ProjectionLoss", "spatial_scale", spatial_scale)
        self.eps = _checks.check_positive("ProjectionLoss", "eps", eps)
        _checks.check_choice("ProjectionLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction

    def forward(self, probs, boxes, box_batch, box_labels):
        return projection_loss(
            probs,
            boxes,
            box_batch,
            box_labels,
            spatial_scale=self.spatial_scale,
            eps=self.eps,
            reduction=self.reduction,
        )


class BorderBackgroundLoss(nn.Module):
    """Module form of :func:`border_background_loss`."""

    def __init__(self, *, eps: float = 1e-6, reduction: str = "mean") -> None:
        super().__init__()
        self.eps = _checks.check_positive("BorderBackgroundLoss", "eps", eps)
        _checks.check_choice("BorderBackgroundLoss", "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction

    def forward(self, fg_probs, border_mask):
        return border_background_loss(fg_probs, border_mask, eps=self.eps, reduction=self.reduction)
