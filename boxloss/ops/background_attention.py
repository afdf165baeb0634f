r"""Background attention and background-aware pooling (BAP), BANA Sec. 3.1.

Oh, Kim and Ham, "Background-Aware Pooling and Noise-Aware Loss for
Weakly-Supervised Semantic Segmentation", CVPR 2021.  For features f (B, D, h, w)
and boxes B_1..B_K (the convention of :mod:`boxloss.ops.boxes`):

.. math::
    q_j = \frac{\sum_{p \in G(j)} M(p) f(p)}{\sum_{p \in G(j)} M(p)}                     \quad (1)

    A(p) = \frac{1}{J} \sum_{j\ \mathrm{valid}} \mathrm{clamp}\Big(\frac{f(p) \cdot q_j}
           {\|f(p)\| \|q_j\|}, 0, 1\Big)\ \ (p \in \mathcal{B}), \qquad A(p) = 1\ \ (p \notin \mathcal{B})  \quad (2, 3)

    r_i = \frac{\sum_{p \in B_i} (1 - A(p)) f(p)}{\sum_{p \in B_i} (1 - A(p))}         \quad (4)

- M, the definite background: the map pixels in no box (or ``bg_mask``).
- G(j): the cells of an N x N grid by integer splits, cell (i, j) holding rows
  ``[floor(i h / N), floor((i + 1) h / N))`` and columns likewise; a cell without
  background is invalid (``valid`` False, its query 0) and J counts the valid ones.
- Each norm is clamped at 1e-8 (a zero feature has cosine 0).  The ReLU of Eq. 3
  is clamped at 1 as well, so rounding never makes 1 - A negative; the
  subgradient is 0 at both ends.
- Fallback: an image whose background fraction is below ``min_background``
  (the official code's 12.5 %) or that has no valid cell gets A = 0 inside its
  boxes, i.e. plain average pooling; ``fallback`` reports it per image.
- Pooling bins: the S x S bins of a box split its covered rows (and columns)
  ``[b, b + n)`` into ``[b + floor(i n / S), b + ceil((i + 1) n / S))``, so every
  bin holds at least one pixel.  A bin whose weight sum is not positive (all
  A >= 1) pools the plain mean (gradient to A zero there).  A box covering no
  pixel pools 0.

Both are fused CPU/CUDA ops (``torch.ops.boxloss.background_attention``,
``background_aware_pool``, and ``background_attention_pool`` computing the two
in one op for :class:`BackgroundAwarePooling`) with their own backward ops
(``boxloss::_<op>_backward``): the full gradient to the
features through the queries (masked means), the cosine normalisations, the
clamps and the 1/J mean, and through the pooling weights.  The GEMMs (queries
and the J dot products per pixel) are batched matrix products; the (B, J, h, w)
dot products are not saved but recomputed in the backward (one GEMM).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded
from boxloss.ops._autograd import first_order_only


class BackgroundAttention(NamedTuple):
    attention: torch.Tensor  # (B, h, w): A, 1 outside the boxes
    queries: torch.Tensor  # (B, N*N, D): q_j, 0 for invalid cells
    valid: torch.Tensor  # (B, N*N) bool: the cell holds definite background
    fallback: torch.Tensor  # (B,) bool: too little background, A = 0 inside the boxes


def _check_features_boxes(fn, features, boxes, box_batch, spatial_scale):
    _checks.check_tensor(fn, "features", features, dim=4, layout="(B, D, h, w)")
    _checks.check_float_dtype(fn, "features", features)
    if 0 in features.shape:
        raise ValueError(f"{fn}: features must be non-empty in every dimension, got shape {tuple(features.shape)}")
    _checks.check_tensor(fn, "boxes", boxes, dim=2, layout="(K, 4)")
    if boxes.shape[1] != 4:
        raise ValueError(f"{fn}: boxes must have shape (K, 4) holding x0, y0, x1, y1, got shape {tuple(boxes.shape)}")
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"{fn}: boxes must be a floating-point tensor, got {boxes.dtype}")
    _checks.check_tensor(fn, "box_batch", box_batch, dim=1, layout="(K,)")
    if box_batch.dtype != torch.long:
        raise TypeError(f"{fn}: box_batch must be an int64 tensor, got {box_batch.dtype}")
    if box_batch.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{fn}: box_batch must have shape (K,) = ({boxes.shape[0]},), got shape {tuple(box_batch.shape)}"
        )
    for name, t in (("boxes", boxes), ("box_batch", box_batch)):
        _checks.check_same(fn, name, t, "features", features, what="device")
    return _checks.check_positive(fn, "spatial_scale", spatial_scale)


def _check_min_background(fn, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{fn}: min_background must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_bg_mask(fn, bg_mask, features) -> None:
    _checks.check_tensor(fn, "bg_mask", bg_mask, dim=3, layout="(B, h, w)")
    if bg_mask.dtype != torch.bool:
        raise TypeError(f"{fn}: bg_mask must be a bool tensor, got {bg_mask.dtype}")
    B, _, h, w = features.shape
    if tuple(bg_mask.shape) != (B, h, w):
        raise ValueError(f"{fn}: bg_mask must have shape (B, h, w) = {(B, h, w)}, got {tuple(bg_mask.shape)}")
    _checks.check_same(fn, "bg_mask", bg_mask, "features", features, what="device")


def background_attention(
    features: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    *,
    grid_size: int = 4,
    spatial_scale: float = 1.0,
    bg_mask: torch.Tensor | None = None,
    min_background: float = 0.125,
) -> BackgroundAttention:
    r"""Background attention map A and grid queries q_j (BANA Eq. 1-3).

    See :mod:`boxloss.ops.background_attention` for the equations and conventions.
    Differentiable with respect to ``features`` through A and the queries.

    Args:
        features: (B, D, h, w) feature map f (any float dtype; NaN or infinite
            values raise ``ValueError``).
        boxes, box_batch: packed boxes in image pixels (:mod:`boxloss.ops.boxes`);
            box labels are not needed.
        grid_size: N, the queries come from an N x N grid (4 for training, 1 for
            pseudo labels in the paper).
        spatial_scale: map coordinate = box coordinate x spatial_scale (1/8 at stride 8).
        bg_mask: optional (B, h, w) bool definite background M (default: pixels in no box).
        min_background: images whose background fraction is below this fall back
            to plain average pooling (A = 0 inside their boxes).

    Returns:
        :class:`BackgroundAttention` (attention (B, h, w), queries (B, N*N, D),
        valid (B, N*N), fallback (B,)).

    Shape:
        features (B, D, h, w), boxes (K, 4), box_batch (K,) -> attention (B, h, w).

    Example:
        >>> f = torch.randn(2, 64, 41, 41, requires_grad=True)
        >>> boxes = torch.tensor([[40., 40., 200., 220.], [0., 100., 160., 321.]])
        >>> out = background_attention(f, boxes, torch.tensor([0, 1]), spatial_scale=1 / 8)
        >>> out.attention.shape, out.queries.shape
        (torch.Size([2, 41, 41]), torch.Size([2, 16, 64]))
        >>> out.attention.sum().backward()
    """
    fn = "background_attention"
    spatial_scale = _check_features_boxes(fn, features, boxes, box_batch, spatial_scale)
    grid_size = _checks.check_int(fn, "grid_size", grid_size, minimum=1)
    min_background = _check_min_background(fn, min_background)
    if bg_mask is not None:
        _check_bg_mask(fn, bg_mask, features)
    if extension_loaded():
        attention, queries, valid, fallback, _, _ = torch.ops.boxloss.background_attention.default(
            features, boxes, box_batch, grid_size, spatial_scale, bg_mask, float(min_background)
        )
        return BackgroundAttention(attention, queries, valid, fallback)
    return BackgroundAttention(
        *_fallback.background_attention(
            fn, features, boxes, box_batch, grid_size, spatial_scale, bg_mask, float(min_background)
        )
    )


def background_aware_pool(
    features: torch.Tensor,
    attention: torch.Tensor,
    boxes: torch.Tensor,
    box_batch: torch.Tensor,
    *,
    output_size: int = 1,
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    r"""Background-aware pooling (BANA Eq. 4): per box the (1 - A)-weighted mean of f.

    With ``output_size`` S > 1 the box is split into S x S bins (integer splits
    of its covered pixels, each bin at least one pixel; the official code uses
    2 x 2) and each bin is pooled, like ``roi_align``'s output.  A bin whose
    weight sum is not positive pools the plain mean; an empty box pools 0.
    Differentiable with respect to ``features`` and ``attention``.

    Args:
        features: (B, D, h, w), finite (NaN or Inf raise ValueError).
        attention: (B, h, w) background attention A, values in [0, 1]; NaN, Inf
            or values outside [0, 1] raise ValueError (weights 1 - A outside
            [0, 1] would pool outside the range of the features).
        boxes, box_batch: packed boxes (:mod:`boxloss.ops.boxes`).
        output_size: S.
        spatial_scale: map coordinate = box coordinate x spatial_scale.

    Shape:
        -> (K, D, S, S).

    Example:
        >>> f = torch.randn(1, 8, 16, 16, requires_grad=True)
        >>> a = torch.rand(1, 16, 16)
        >>> background_aware_pool(f, a, torch.tensor([[2., 2., 12., 10.]]), torch.tensor([0]),
        ...                       output_size=2).shape
        torch.Size([1, 8, 2, 2])
    """
    fn = "background_aware_pool"
    spatial_scale = _check_features_boxes(fn, features, boxes, box_batch, spatial_scale)
    output_size = _checks.check_int(fn, "output_size", output_size, minimum=1)
    _checks.check_tensor(fn, "attention", attention, dim=3, layout="(B, h, w)")
    if not attention.dtype.is_floating_point:
        raise TypeError(f"{fn}: attention must be a floating-point tensor, got {attention.dtype}")
    B, _, h, w = features.shape
    if tuple(attention.shape) != (B, h, w):
        raise ValueError(f"{fn}: attention must have shape (B, h, w) = {(B, h, w)}, got {tuple(attention.shape)}")
    _checks.check_same(fn, "attention", attention, "features", features, what="device")
    if extension_loaded():
        pooled, _, _ = torch.ops.boxloss.background_aware_pool.default(
            features, attention, boxes, box_batch, output_size, spatial_scale
        )
        return pooled
    return _fallback.background_aware_pool(fn, features, attention, boxes, box_batch, output_size, spatial_scale)


class BackgroundAwarePooling(nn.Module):
    r"""Background attention (Eq. 1-3) followed by background-aware pooling (Eq. 4).

    The same values as :func:`background_attention` then :func:`background_aware_pool`,
    computed by one fused op (``boxloss::background_attention_pool``) whose backward
    writes the attention's feature gradient into the pooling's, so the backward holds
    one feature-sized gradient instead of two that autograd would add.

    ``forward(features, boxes, box_batch)`` returns ``(pooled, attention)``:
    pooled (K, D, S, S) and the :class:`BackgroundAttention` (its queries and
    validity feed :func:`boxloss.bap_classification_loss`).

    Example:
        >>> bap = BackgroundAwarePooling(grid_size=4, output_size=2, spatial_scale=1 / 8)
        >>> pooled, att = bap(torch.randn(2, 32, 41, 41), torch.tensor([[40., 40., 200., 220.]]),
        ...                   torch.tensor([1]))
        >>> pooled.shape
        torch.Size([1, 32, 2, 2])
    """

    def __init__(
        self, *, grid_size: int = 4, output_size: int = 1, spatial_scale: float = 1.0, min_background: float = 0.125
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.min_background = min_background

    def forward(self, features, boxes, box_batch, bg_mask=None):
        fn = "BackgroundAwarePooling"
        if extension_loaded():
            # One fused op: its backward adds the attention's feature gradient into the pooling's.
            spatial_scale = _check_features_boxes(fn, features, boxes, box_batch, self.spatial_scale)
            grid_size = _checks.check_int(fn, "grid_size", self.grid_size, minimum=1)
            output_size = _checks.check_int(fn, "output_size", self.output_size, minimum=1)
            if bg_mask is not None:
                _check_bg_mask(fn, bg_mask, features)
            pooled, attention, queries, valid, fallback, *_ = torch.ops.boxloss.background_attention_pool.default(
                features,
                boxes,
                box_batch,
                grid_size,
                output_size,
                spatial_scale,
                bg_mask,
                _check_min_background(fn, self.min_background),
            )
            return pooled, BackgroundAttention(attention, queries, valid, fallback)
        att = background_attention(
            features,
            boxes,
            box_batch,
            grid_size=self.grid_size,
            spatial_scale=self.spatial_scale,
            bg_mask=bg_mask,
            min_background=self.min_background,
        )
        pooled = background_aware_pool(
            features, att.attention, boxes, box_batch, output_size=self.output_size, spatial_scale=self.spatial_scale
        )
        return pooled, att

    def extra_repr(self) -> str:
        return (
            f"grid_size={self.grid_size}, output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"min_background={self.min_background}"
        )


def _register() -> None:
    def _compute_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("boxloss::background_attention")
    def _background_attention_fake(features, boxes, box_batch, grid_size, spatial_scale, bg_mask, min_background):
        B, D, h, w = features.shape
        J = grid_size * grid_size
        return (
            features.new_empty((B, h, w)),
            features.new_empty((B, J, D)),
            features.new_empty((B, J), dtype=torch.bool),
            features.new_empty((B,), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
        )

    @torch.library.register_fake("boxloss::_background_attention_backward")
    def _background_attention_backward_fake(
        grad_attention, grad_queries, features, queries, valid, fallback, inside, background, grid_size
    ):
        return features.new_empty(features.shape)

    def setup_attention(ctx, inputs, output):
        features, _, _, grid_size, _, _, _ = inputs
        _, queries, valid, fallback, inside, background = output
        ctx.save_for_backward(features, queries, valid, fallback, inside, background)
        ctx.grid_size = grid_size
        ctx.mark_non_differentiable(valid, fallback, inside, background)
        ctx.set_materialize_grads(False)

    def backward_attention(ctx, grad_attention, grad_queries, *_):
        features, queries, valid, fallback, inside, background = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        B, D, h, w = features.shape
        if grad_attention is None:
            grad_attention = features.new_zeros((B, h, w))
        if grad_queries is None:
            grad_queries = queries.new_zeros(queries.shape)
        grad = torch.ops.boxloss._background_attention_backward.default(
            grad_attention, grad_queries, features, queries, valid, fallback, inside, background, ctx.grid_size
        )
        # Boxes and the background mask only select pixels: no gradient.
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::background_attention", backward_attention, setup_context=setup_attention)

    @torch.library.register_fake("boxloss::background_aware_pool")
    def _background_aware_pool_fake(features, attention, boxes, box_batch, output_size, spatial_scale):
        K, D, S = boxes.shape[0], features.shape[1], output_size
        return (
            features.new_empty((K, D, S, S)),
            features.new_empty((K, S, S), dtype=_compute_dtype(features.dtype)),
            features.new_empty((K, 4), dtype=torch.long),
        )

    @torch.library.register_fake("boxloss::_background_aware_pool_backward")
    def _background_aware_pool_backward_fake(
        grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch, output_size
    ):
        return features.new_empty(features.shape), attention.new_empty(attention.shape)

    def setup_pool(ctx, inputs, output):
        features, attention, _, box_batch, output_size, _ = inputs
        pooled, weight_sum, ranges = output
        ctx.save_for_backward(features, attention, pooled, weight_sum, ranges, box_batch)
        ctx.output_size = output_size
        ctx.mark_non_differentiable(weight_sum, ranges)
        ctx.set_materialize_grads(False)

    def backward_pool(ctx, grad_pooled, *_):
        features, attention, pooled, weight_sum, ranges, box_batch = ctx.saved_tensors
        if grad_pooled is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 6
        grad_features, grad_attention = torch.ops.boxloss._background_aware_pool_backward.default(
            grad_pooled, features, attention, pooled, weight_sum, ranges, box_batch, ctx.output_size
        )
        return (
            grad_features if ctx.needs_input_grad[0] else None,
            grad_attention if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("boxloss::background_aware_pool", backward_pool, setup_context=setup_pool)

    @torch.library.register_fake("boxloss::background_attention_pool")
    def _background_attention_pool_fake(
        features, boxes, box_batch, grid_size, output_size, spatial_scale, bg_mask, min_background
    ):
        B, D, h, w = features.shape
        K, S, J = boxes.shape[0], output_size, grid_size * grid_size
        return (
            features.new_empty((K, D, S, S)),
            features.new_empty((B, h, w)),
            features.new_empty((B, J, D)),
            features.new_empty((B, J), dtype=torch.bool),
            features.new_empty((B,), dtype=torch.bool),
            features.new_empty((K, S, S), dtype=_compute_dtype(features.dtype)),
            features.new_empty((K, 4), dtype=torch.long),
            features.new_empty((B, h, w), dtype=torch.bool),
            features.new_empty((B, h, w), dtype=torch.bool),
        )

    @torch.library.register_fake("boxloss::_background_attention_pool_backward")
    def _background_attention_pool_backward_fake(grad_pooled, grad_attention, grad_queries, features, *_):
        return features.new_empty(features.shape)

    def setup_attention_pool(ctx, inputs, output):
        features, _, box_batch, grid_size, output_size, _, _, _ = inputs
        pooled, attention, queries, valid, fallback, weight_sum, ranges, inside, background = output
        ctx.save_for_backward(
            features, attention, queries, valid, fallback, pooled, weight_sum, ranges, box_batch, inside, background
        )
        ctx.settings = (grid_size, output_size)
        ctx.mark_non_differentiable(valid, fallback, weight_sum, ranges, inside, background)
        ctx.set_materialize_grads(False)

    def backward_attention_pool(ctx, grad_pooled, grad_attention, grad_queries, *_):
        (features, attention, queries, valid, fallback, pooled, weight_sum, ranges, box_batch, inside, background) = (
            ctx.saved_tensors
        )
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if grad_pooled is None:
            grad_pooled = pooled.new_zeros(pooled.shape)
        if grad_attention is None:
            grad_attention = attention.new_zeros(attention.shape)
        if grad_queries is None:
            grad_queries = queries.new_zeros(queries.shape)
        grad = torch.ops.boxloss._background_attention_pool_backward.default(
            grad_pooled,
            grad_attention,
            grad_queries,
            features,
            attention,
            queries,
            valid,
            fallback,
            pooled,
            weight_sum,
            ranges,
            box_batch,
            inside,
            background,
            *ctx.settings,
        )
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "boxloss::background_attention_pool", backward_attention_pool, setup_context=setup_attention_pool
    )

    # Second derivatives through the cosines, clamps and weighted means are not implemented.
    first_order_only("_background_attention_backward", "background_attention")
    first_order_only("_background_aware_pool_backward", "background_aware_pool")
    first_order_only("_background_attention_pool_backward", "BackgroundAwarePooling")


if extension_loaded():
    _register()
