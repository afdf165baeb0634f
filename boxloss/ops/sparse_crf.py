"""The Sparse-CRF loss on a local neighbourhood: ``boxloss::sparse_crf_loss``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded

_FN = "sparse_crf_loss"
KINDS = ("l1", "potts")
NEIGHBOURHOODS = (4, 8)


def _check_sparse_crf_args(probs, image, sigma, neighbourhood, dilation, valid_mask, kind, channels, reduction):
    probs = _checks.check_tensor(_FN, "probs", probs, dim=4, layout="(B, C, H, W)")
    image = _checks.check_tensor(_FN, "image", image, dim=4, layout="(B, K, H, W)")
    _checks.check_float_dtype(_FN, "probs", probs)
    _checks.check_same(_FN, "image", image, "probs", probs, what="dtype")
    _checks.check_same(_FN, "image", image, "probs", probs, what="device")
    B, C, H, W = probs.shape
    if B == 0 or C == 0 or H == 0 or W == 0:
        raise ValueError(f"{_FN}: probs must be non-empty in every dimension, got shape {tuple(probs.shape)}")
    if image.shape[0] != B or image.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"{_FN}: image must match probs in B, H and W (probs {tuple(probs.shape)}), got shape {tuple(image.shape)}"
        )
    if image.shape[1] == 0:
        raise ValueError(f"{_FN}: image must have at least one channel, got shape {tuple(image.shape)}")
    sigma = _checks.check_positive(_FN, "sigma", sigma)
    if isinstance(neighbourhood, bool) or neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(f"{_FN}: neighbourhood must be 4 or 8, got {neighbourhood!r}")
    dilation = _checks.check_int(_FN, "dilation", dilation, minimum=1)
    _checks.check_choice(_FN, "kind", kind, KINDS)
    _checks.check_choice(_FN, "reduction", reduction, _checks.REDUCTIONS)
    if valid_mask is not None:
        _checks.check_tensor(_FN, "valid_mask", valid_mask, dim=3, layout="(B, H, W)")
        if valid_mask.dtype != torch.bool:
            raise TypeError(f"{_FN}: valid_mask must be a bool tensor, got {valid_mask.dtype}")
        if valid_mask.shape != (B, H, W):
            raise ValueError(f"{_FN}: valid_mask must have shape {(B, H, W)}, got {tuple(valid_mask.shape)}")
        _checks.check_same(_FN, "valid_mask", valid_mask, "probs", probs, what="device")
    channels = _checks.normalise_channels(_FN, channels, C)
    return sigma, int(neighbourhood), dilation, channels


def sparse_crf_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    sigma: float = 0.15,
    neighbourhood: int = 8,
    dilation: int = 1,
    valid_mask: torch.Tensor | None = None,
    kind: str = "l1",
    channels: Sequence[int] | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Sparse-CRF pairwise loss (Ji & Veksler, BMVC 2021, Eq. 1), fused.

    .. math::
        L_b = \frac{1}{|P_b|} \sum_{(p,q) \in N} w_{pq} \sum_{c \in S} \phi(x^c_p, x^c_q),
        \qquad w_{pq} = \exp\Big(-\frac{\lVert I_p - I_q \rVert^2}{2\sigma^2}\Big)

    with :math:`\phi(a, b) = |a - b|` for ``kind="l1"`` (the paper's Eq. 1) or
    :math:`\phi(a, b) = a(1-b) + b(1-a)` for ``kind="potts"`` (the quadratic
    relaxation of the DenseCRF loss of Tang et al., on a sparse neighbourhood).

    ``N`` holds each unordered pair of ``neighbourhood``-connected pixels
    ``dilation`` pixels apart once (4: right and down; 8: also the two
    diagonals); a pair with an invalid end is dropped.  ``P_b`` is the set of
    valid pixels of image ``b``; an image with none contributes 0.  The colour
    weights are computed on the fly and never stored.

    Args:
        probs: probabilities in [0, 1], e.g. a softmax or sigmoid output.  ``C = 1``
            is exactly Eq. 1's binary map.  Values outside [0, 1], NaN or Inf raise
            ``ValueError`` (logits are the usual mistake).
        image: colours ``I``; ``sigma`` is in the units of ``image``.  The paper's
            ``sigma = 0.15`` assumes colours in [0, 1] (divide uint8 images by 255);
            use ``sigma * 255`` for [0, 255] images, and a larger value for
            normalised (mean/std) images.  ``image`` is a constant: it gets no gradient.
        sigma: colour scale of the weights, > 0.
        neighbourhood: 4 or 8.
        dilation: distance in pixels between paired neighbours, >= 1.
        valid_mask: bool, False at void or padding pixels.
        kind: ``"l1"`` or ``"potts"``.
        channels: the channels ``S`` to sum over (default all); e.g. ``channels=[1]``
            skips the background channel of a 2-channel softmax, as the single-class
            code of the paper does.  Negative indices count from the end.
        reduction: ``"mean"`` (over the batch of per-image losses), ``"sum"``, or
            ``"none"`` (the ``(B,)`` per-image losses).

    The gradient flows to ``probs`` only: ``w_pq sign(x_p - x_q)`` per pair for
    ``l1`` (with ``sign(0) = 0``), ``w_pq (1 - 2 x_q)`` for ``potts``.

    Shape:
        - probs: :math:`(B, C, H, W)`, float16/bfloat16 (run in float32 on the CPU,
          accumulated in float32 on CUDA), float32 or float64.
        - image: :math:`(B, K, H, W)` with ``K >= 1`` (3 for RGB), dtype of ``probs``.
        - valid_mask: :math:`(B, H, W)`, bool.
        - output: scalar, or :math:`(B,)` for ``reduction="none"``.

    Example:
        >>> import torch, boxloss
        >>> logits = torch.randn(2, 21, 64, 64, requires_grad=True)
        >>> image = torch.rand(2, 3, 64, 64)
        >>> loss = boxloss.sparse_crf_loss(logits.softmax(1), image, sigma=0.15)
        >>> loss.backward()
    """
    sigma, neighbourhood, dilation, channel_list = _check_sparse_crf_args(
        probs, image, sigma, neighbourhood, dilation, valid_mask, kind, channels, reduction
    )
    if extension_loaded():
        per_image = torch.ops.boxloss.sparse_crf_loss.default(
            probs, image, valid_mask, channel_list, sigma, neighbourhood, dilation, kind
        )
    else:
        per_image = _fallback.sparse_crf_loss(
            _FN, probs, image, valid_mask, channel_list, sigma, neighbourhood, dilation, kind
        )
    return _checks.reduce_per_image(per_image, reduction)


def _register() -> None:
    @torch.library.register_fake("boxloss::sparse_crf_loss")
    def _sparse_crf_loss_fake(probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind):
        return probs.new_empty((probs.shape[0],))

    @torch.library.register_fake("boxloss::_sparse_crf_loss_backward")
    def _sparse_crf_loss_backward_fake(grad, probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind):
        # The real kernels return a contiguous (B, C, H, W) tensor whatever the
        # layout of probs.
        return probs.new_empty(probs.shape)

    def setup_context(ctx, inputs, output):
        probs, image, valid_mask, channels, sigma, neighbourhood, dilation, kind = inputs
        ctx.save_for_backward(probs, image, valid_mask)
        ctx.settings = (channels, sigma, neighbourhood, dilation, kind)

    def backward(ctx, grad):
        probs, image, valid_mask = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.ops.boxloss._sparse_crf_loss_backward.default(
                grad, probs, image, valid_mask, *ctx.settings
            )
        # The image (and so the colour weights) is a constant of the loss.
        return grad_probs, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::sparse_crf_loss", backward, setup_context=setup_context)

    # The backward G(grad, x) = grad_b * sum_q w_pq phi'(x_p, x_q) is linear in grad,
    # piecewise constant in x for "l1" (sign(x_p - x_q)) and affine in x for
    # "potts" (1 - 2 x_q).  So its derivative is exact with the backward op itself:
    #   d<gg, G>/d grad_b = sum over image b of gg * G(1, x),
    #   d<gg, G>/dx       = G(grad, gg) - G(grad, 0) for potts (the Hessian -2 W
    #                       applied to gg, W symmetric), 0 for l1.
    def backward_setup_context(ctx, inputs, output):
        grad, probs, image, valid_mask, *settings = inputs
        ctx.save_for_backward(grad, probs, image, valid_mask)
        ctx.settings = settings

    def backward_backward(ctx, grad_grad_probs):
        grad, probs, image, valid_mask = ctx.saved_tensors
        if grad_grad_probs is None:
            return (None,) * 9
        gradient = torch.ops.boxloss._sparse_crf_loss_backward.default
        grad_grad = None
        if ctx.needs_input_grad[0]:
            per_unit = gradient(torch.ones_like(grad), probs, image, valid_mask, *ctx.settings)
            grad_grad = (grad_grad_probs * per_unit).sum((1, 2, 3)).to(grad.dtype)
        grad_probs = None
        if ctx.needs_input_grad[1] and ctx.settings[-1] == "potts":
            direction = grad_grad_probs.to(probs.dtype)
            grad_probs = gradient(grad, direction, image, valid_mask, *ctx.settings) - gradient(
                grad, torch.zeros_like(direction), image, valid_mask, *ctx.settings
            )
        return grad_grad, grad_probs, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "boxloss::_sparse_crf_loss_backward", backward_backward, setup_context=backward_setup_context
    )


if extension_loaded():
    _register()
