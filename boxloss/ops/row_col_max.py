r"""The fused row and column maxima of each box's class channel: ``boxloss::box_row_col_max``.

For many boxes of many images in one kernel call, the maximum of the box's
class channel along each row and column the box covers (the convention of
:mod:`boxloss.ops.boxes`); the tight-box, MIL and projection priors of
:mod:`boxloss.losses.box_priors` are built on it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded
from boxloss.ops.boxes import check_box_args


def row_col_max_dense(fn, probs, boxes, box_batch, box_labels, spatial_scale):
    """(row_max (K, H), col_max (K, W), ranges (K, 4)) through the fused op; arguments checked by the caller."""
    if extension_loaded():
        row_max, col_max, _, _, ranges = torch.ops.boxloss.box_row_col_max.default(
            probs, boxes, box_batch, box_labels, spatial_scale
        )
        return row_max, col_max, ranges
    return _fallback.box_row_col_max(fn, probs, boxes, box_batch, box_labels, spatial_scale)


def covered(ranges: torch.Tensor, size: int, begin: int) -> torch.Tensor:
    """(K, size) bool: position i lies in [ranges[:, begin], ranges[:, begin + 1])."""
    pos = torch.arange(size, device=ranges.device)
    return (pos >= ranges[:, begin : begin + 1]) & (pos < ranges[:, begin + 1 : begin + 2])


class BoxRowColMax(NamedTuple):
    """Result of :func:`box_row_col_max`.

    Packed layout (the default): ``row_max[row_offsets[k]:row_offsets[k+1]]``
    are box k's row maxima, top row first; ``col_max`` likewise, left column
    first.  Dense layout: ``row_max`` is (K, H) with box k's values at the map
    rows it covers and 0 elsewhere (and (K, W) for ``col_max``); the offsets
    are then None.  ``ranges`` (K, 4) holds each box's covered
    ``row_begin, row_end, col_begin, col_end`` on the map, and ``empty`` (K,)
    marks the boxes that cover no pixel (counted by :attr:`num_empty`).
    """

    row_max: torch.Tensor
    col_max: torch.Tensor
    row_offsets: torch.Tensor | None
    col_offsets: torch.Tensor | None
    ranges: torch.Tensor
    empty: torch.Tensor

    @property
    def num_empty(self) -> int:
        return int(self.empty.sum())


def box_row_col_max(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    box_labels: torch.Tensor,
    *,
    spatial_scale: float = 1.0,
    layout: str = "packed",
) -> BoxRowColMax:
    r"""Maximum of each box's class channel along every row and column it covers.

    .. math::
        \mathrm{rowmax}_k(r) = \max_{c \in \mathrm{cols}_k} x_{b_k, l_k, r, c}, \qquad
        \mathrm{colmax}_k(c) = \max_{r \in \mathrm{rows}_k} x_{b_k, l_k, r, c}

    for every covered row ``r`` and column ``c`` of box ``k`` (image ``b_k``,
    label ``l_k``).  Differentiable: the gradient of each maximum goes to its
    arg-max pixel, of equal values the one with the lowest index (leftmost in a
    row, topmost in a column), so results are deterministic.  All boxes of all
    images run in one fused CPU or CUDA kernel.

    Args:
        probs: (B, C, H, W) map, any float dtype (usually probabilities).  NaN
            inside a box raises ``ValueError``.
        boxes, box_batch, box_labels: packed boxes, see :mod:`boxloss.ops.boxes`.
        spatial_scale: map coordinate = box coordinate x spatial_scale.
        layout: ``"packed"`` (values of all boxes concatenated, with offsets) or
            ``"dense"`` ((K, H) and (K, W), zero outside each box).

    Returns:
        :class:`BoxRowColMax`.

    Example:
        >>> probs = torch.rand(2, 21, 64, 64, requires_grad=True)
        >>> boxes = torch.tensor([[8., 8., 40., 30.], [0., 10., 64., 64.]])
        >>> out = box_row_col_max(probs, boxes, torch.tensor([0, 1]), torch.tensor([3, 15]))
        >>> out.row_offsets
        tensor([ 0, 22, 76])
        >>> out.row_max.sum().backward()
    """
    fn = "box_row_col_max"
    spatial_scale = check_box_args(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    _checks.check_choice(fn, "layout", layout, ("packed", "dense"))
    row_max, col_max, ranges = row_col_max_dense(fn, probs, boxes, box_batch, box_labels, spatial_scale)
    heights = ranges[:, 1] - ranges[:, 0]
    widths = ranges[:, 3] - ranges[:, 2]
    empty = (heights <= 0) | (widths <= 0)
    if layout == "dense":
        return BoxRowColMax(row_max, col_max, None, None, ranges, empty)
    H, W = probs.shape[2:]
    zero = ranges.new_zeros(1)
    return BoxRowColMax(
        row_max[covered(ranges, H, 0)],
        col_max[covered(ranges, W, 2)],
        torch.cat([zero, heights.cumsum(0)]),
        torch.cat([zero, widths.cumsum(0)]),
        ranges,
        empty,
    )


def _register() -> None:
    @torch.library.register_fake("boxloss::box_row_col_max")
    def _box_row_col_max_fake(probs, boxes, box_batch, box_labels, spatial_scale):
        K = boxes.shape[0]
        H, W = probs.shape[2], probs.shape[3]
        return (
            probs.new_empty((K, H)),
            probs.new_empty((K, W)),
            probs.new_empty((K, H), dtype=torch.long),
            probs.new_empty((K, W), dtype=torch.long),
            probs.new_empty((K, 4), dtype=torch.long),
        )

    @torch.library.register_fake("boxloss::_box_row_col_max_backward")
    def _box_row_col_max_backward_fake(grad_row_max, grad_col_max, row_index, col_index, probs_shape):
        return grad_row_max.new_empty(probs_shape)

    def setup_context(ctx, inputs, output):
        probs = inputs[0]
        _, _, row_index, col_index, _ = output
        ctx.save_for_backward(row_index, col_index)
        ctx.probs_shape = probs.shape
        ctx.dtype = output[0].dtype
        ctx.mark_non_differentiable(row_index, col_index, output[4])
        # No zero gradients for the index outputs (or for an unused maximum) are made up.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_row_max, grad_col_max, _grad_row_index, _grad_col_index, _grad_ranges):
        row_index, col_index = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0] and (grad_row_max is not None or grad_col_max is not None):
            if grad_row_max is None:
                grad_row_max = row_index.new_zeros(row_index.shape, dtype=ctx.dtype)
            if grad_col_max is None:
                grad_col_max = col_index.new_zeros(col_index.shape, dtype=ctx.dtype)
            grad_probs = torch.ops.boxloss._box_row_col_max_backward.default(
                grad_row_max, grad_col_max, row_index, col_index, list(ctx.probs_shape)
            )
        # Box coordinates only select pixels: the maxima are piecewise constant in them.
        return grad_probs, None, None, None, None

    torch.library.register_autograd("boxloss::box_row_col_max", backward, setup_context=setup_context)

    # The backward scatters each maximum's gradient to its arg-max pixel: linear in
    # the incoming gradients, and the arg-max indices are piecewise constant in
    # probs.  Its derivative is exact and cheap: a gather of the outer gradient
    # at the same indices (and 0 for probs, whose maxima have no curvature).
    def backward_setup_context(ctx, inputs, output):
        grad_row_max, _, row_index, col_index, _ = inputs
        ctx.save_for_backward(row_index, col_index)
        ctx.dtype = grad_row_max.dtype

    def backward_backward(ctx, grad_grad_probs):
        row_index, col_index = ctx.saved_tensors
        if grad_grad_probs is None:
            return None, None, None, None, None
        flat = grad_grad_probs.reshape(-1).to(ctx.dtype)
        return _gather_at(flat, row_index), _gather_at(flat, col_index), None, None, None

    torch.library.register_autograd(
        "boxloss::_box_row_col_max_backward", backward_backward, setup_context=backward_setup_context
    )


def _gather_at(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index] where index >= 0, 0 where it is -1 (a row or column the box does not cover)."""
    return torch.where(index >= 0, flat[index.clamp_min(0)], flat.new_zeros(()))


if extension_loaded():
    _register()
