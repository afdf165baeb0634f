r"""The DenseCRF loss of Tang et al. on the permutohedral lattice: ``boxloss::dense_crf_loss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded
from boxloss.ops.lattice import PermutohedralLattice, check_rgb_image

_DENSE = "dense_crf_loss"


def _check_dense_crf_args(probs, image, sigma_rgb, sigma_xy, scale_factor, valid_mask, reduction, normalize):
    probs = _checks.check_tensor(_DENSE, "probs", probs, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(_DENSE, "probs", probs)
    B, C, H, W = probs.shape
    if B == 0 or C == 0 or H == 0 or W == 0:
        raise ValueError(f"{_DENSE}: probs must be non-empty in every dimension, got shape {tuple(probs.shape)}")
    check_rgb_image(_DENSE, image, like=("probs", probs))
    sigma_rgb = _checks.check_positive(_DENSE, "sigma_rgb", sigma_rgb)
    sigma_xy = _checks.check_positive(_DENSE, "sigma_xy", sigma_xy)
    scale_factor = _checks.check_positive(_DENSE, "scale_factor", scale_factor)
    if int(H * scale_factor) < 1 or int(W * scale_factor) < 1:
        raise ValueError(
            f"{_DENSE}: scale_factor {scale_factor} leaves no pixel of the {H} x {W} probabilities "
            f"(the resized size is floor(size * scale_factor))"
        )
    _checks.check_choice(_DENSE, "reduction", reduction, _checks.REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"{_DENSE}: normalize must be a bool, got {type(normalize).__name__}")
    if valid_mask is not None:
        _checks.check_tensor(_DENSE, "valid_mask", valid_mask, dim=3, layout="(B, H, W)")
        if valid_mask.dtype != torch.bool:
            raise TypeError(f"{_DENSE}: valid_mask must be a bool tensor, got {valid_mask.dtype}")
        if valid_mask.shape != (B, H, W):
            raise ValueError(f"{_DENSE}: valid_mask must have shape {(B, H, W)}, got {tuple(valid_mask.shape)}")
        _checks.check_same(_DENSE, "valid_mask", valid_mask, "probs", probs, what="device")
    return sigma_rgb, sigma_xy, scale_factor


def _resize_like_tang(probs, image, valid_mask, scale_factor):
    """The resizing of Tang et al.'s DenseCRFLoss: bilinear probabilities, nearest image and mask."""
    probs = F.interpolate(probs, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    image = F.interpolate(image, scale_factor=scale_factor, mode="nearest")
    if valid_mask is not None:
        valid_mask = F.interpolate(valid_mask[:, None].to(image.dtype), scale_factor=scale_factor, mode="nearest")
        valid_mask = valid_mask[:, 0] > 0.5
    return probs, image, valid_mask


def dense_crf_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 80.0,
    scale_factor: float = 1.0,
    valid_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    r"""DenseCRF loss of Tang et al. (ECCV 2018) on the permutohedral lattice, all classes in one pass.

    The Potts relaxation with a dense Gaussian bilateral affinity, per image:

    .. math::
        E(S) = \sum_k S_k^\top W (1 - S_k), \qquad
        W_{ij} = \exp\Big(-\frac{\lVert p_i - p_j\rVert^2}{2\sigma_{xy}^2}
                          -\frac{\lVert I_i - I_j\rVert^2}{2\sigma_{rgb}^2}\Big) \; (i \ne j), \quad W_{ii} = 0,

    over the valid pixels (an invalid pixel enters neither as ``i`` nor as
    ``j``), normalised by the total affinity of the valid pairs:

    .. math::
        L = \frac{E(S)}{Z}, \qquad Z = \mathbf 1^\top W \mathbf 1 = \sum_{i \ne j \text{ valid}} W_{ij}.

    For probabilities that sum to one over the classes, ``L`` is the
    affinity-weighted fraction of pixel pairs that two independent draws from
    ``S`` label differently: it lies in [0, 1] (0 for a constant one-hot map)
    whatever the image size and sigmas.  ``normalize=False`` returns ``E``
    itself; Tang et al. minimise ``-sum_k S_k^T W S_k`` times a weight of about
    2e-9 (averaged over the batch), which is ``E`` minus the constant
    ``1^T W 1`` when ``S`` sums to one, so ``weight * dense_crf_loss(...,
    normalize=False)`` has their scale and gradient.  ``weight * Z`` converts
    their weight to this normalisation: Z is about 5e7 for a 513 x 513 crop at
    scale 0.5 with the default sigmas (8e8 at scale 1), so their 2e-9 is about
    0.1 here.

    W is applied with the permutohedral lattice (:mod:`boxloss.ops.lattice`, the
    filter Tang et al. use): ``W = (L + L^T)/2 - diag(c)``, the lattice filter
    symmetrised over its two blur orders, minus the self-affinity ``c_i`` the
    lattice is known to give each pixel (a lower bound of its own weight, so
    every entry of W stays >= 0 and ``E >= 0`` exactly).  The loss then
    matches the exact Gaussian (brute force) to about 1-2 % on natural
    images (docs/lattice.md); the lattice's overall scale cancels in ``E / Z``.

    Gradient: :math:`\partial E / \partial S_k = W \mathbf 1 - 2 W S_k` at
    valid pixels (0 elsewhere), divided by ``Z`` when normalised.  ``W 1`` is
    the same for every class, so through a softmax this is Tang's ``-2 W S``.
    The backward reuses the forward's lattice and filters in both axis orders
    (it filters again rather than keep the forward's filtered values), so the
    gradient is exact for the op.  Double backward is exact as well (the
    Hessian is ``-2 W``).  No gradient flows to ``image``.

    Args:
        probs: probabilities in [0, 1] (a softmax output); NaN, Inf or values
            outside [0, 1] raise ``ValueError``.
        image: (B, 3, H, W) colours in [0, 255] as in the paper (``sigma_rgb`` is
            in the units of ``image``), any float dtype; a constant.
        sigma_rgb: colour scale, > 0 (15 in Tang et al. and Box to Tag and Back).
        sigma_xy: spatial scale in pixels at full resolution, > 0 (80 in the papers).
        scale_factor: resize before the loss, as Tang et al.: probabilities
            bilinearly (``align_corners=False``), the image and ``valid_mask``
            nearest, ``sigma_xy`` times ``scale_factor`` (0.5 in their setting).
        valid_mask: (B, H, W) bool, False at void or padding pixels.
        reduction: ``"mean"`` over the batch of per-image losses, ``"sum"``, or ``"none"`` (B,).
        normalize: divide each image's ``E`` by its ``Z`` (default); an image
            with no valid pair (``Z = 0``) gives 0.

    Shape:
        - probs: :math:`(B, C, H, W)`, float16/bfloat16 (run in float32), float32 or float64.
        - image: :math:`(B, 3, H, W)`.
        - valid_mask: :math:`(B, H, W)`, bool.
        - output: scalar, or :math:`(B,)` for ``reduction="none"``.

    Example:
        >>> logits = torch.randn(2, 21, 64, 64, requires_grad=True)
        >>> image = torch.rand(2, 3, 64, 64) * 255
        >>> loss = boxloss.dense_crf_loss(logits.softmax(1), image, scale_factor=0.5)
        >>> loss.backward()
    """
    sigma_rgb, sigma_xy, scale_factor = _check_dense_crf_args(
        probs, image, sigma_rgb, sigma_xy, scale_factor, valid_mask, reduction, normalize
    )
    if scale_factor != 1.0:
        probs, image, valid_mask = _resize_like_tang(probs, image, valid_mask, scale_factor)
        sigma_xy = sigma_xy * scale_factor
    compute = torch.float64 if probs.dtype == torch.float64 else torch.float32
    lattice = PermutohedralLattice(image.to(compute), sigma_xy, sigma_rgb)
    if extension_loaded():
        energy, normaliser = torch.ops.boxloss.dense_crf_loss.default(probs, valid_mask, *lattice.tensors)
    else:
        energy, normaliser = _fallback.dense_crf_energy(_DENSE, probs, valid_mask, lattice.tensors)
    if normalize:
        per_image = torch.where(
            normaliser > 0, energy / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny), torch.zeros_like(energy)
        )
    else:
        per_image = energy
    return _checks.reduce_per_image(per_image, reduction)


def _register() -> None:
    @torch.library.register_fake("boxloss::dense_crf_loss")
    def _dense_crf_loss_fake(probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets):
        return probs.new_empty((probs.shape[0],)), probs.new_empty((probs.shape[0],))

    @torch.library.register_fake("boxloss::_dense_crf_loss_backward")
    def _dense_crf_loss_backward_fake(
        grad_energy, probs, valid_mask, splat_index, splat_weight, blur_neighbours, vertex_offsets
    ):
        return probs.new_empty(probs.shape)

    def setup_context(ctx, inputs, output):
        probs, valid_mask, *lattice = inputs
        # Only the inputs: the backward filters the probabilities again instead of
        # keeping the forward's (C + 1)-channel filtered values.
        ctx.save_for_backward(probs, valid_mask, *lattice)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_energy, _grad_normaliser):
        probs, valid_mask, *lattice = ctx.saved_tensors
        grad_probs = None
        if ctx.needs_input_grad[0] and grad_energy is not None:
            grad_probs = torch.ops.boxloss._dense_crf_loss_backward.default(grad_energy, probs, valid_mask, *lattice)
        return grad_probs, None, None, None, None, None

    torch.library.register_autograd("boxloss::dense_crf_loss", backward, setup_context=setup_context)

    # E is quadratic in S, so the backward G(g, S) = g m (W m - 2 W S) is linear in
    # g and affine in S (the backward op recomputes its filters from S):
    #   d<gg, G>/dg_b = sum over image b of gg * G(1, S),
    #   d<gg, G>/dS   = G(g, gg) - G(g, 0) = -2 g m W (m gg)   (W symmetric),
    # exact, with the backward op itself.
    def backward_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_backward(ctx, grad_grad_probs):
        grad_energy, probs, valid_mask, *lattice = ctx.saved_tensors
        if grad_grad_probs is None:
            return (None,) * 7
        gradient = torch.ops.boxloss._dense_crf_loss_backward.default
        grad_grad_energy = grad_probs = None
        if ctx.needs_input_grad[0]:
            per_unit = gradient(torch.ones_like(grad_energy), probs, valid_mask, *lattice)
            grad_grad_energy = (grad_grad_probs * per_unit).sum((1, 2, 3)).to(grad_energy.dtype)
        if ctx.needs_input_grad[1]:
            direction = grad_grad_probs.to(probs.dtype)
            grad_probs = gradient(grad_energy, direction, valid_mask, *lattice) - gradient(
                grad_energy, torch.zeros_like(direction), valid_mask, *lattice
            )
        return grad_grad_energy, grad_probs, None, None, None, None, None

    torch.library.register_autograd(
        "boxloss::_dense_crf_loss_backward", backward_backward, setup_context=backward_setup_context
    )


if extension_loaded():
    _register()
