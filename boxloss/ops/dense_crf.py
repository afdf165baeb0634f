"""Pairwise (CRF) regularisers on probability maps: the Sparse-CRF loss on a local
neighbourhood and the DenseCRF loss on the permutohedral lattice."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from boxloss import _checks
from boxloss._extension import extension_loaded, warn_fallback
from boxloss.lattice import PermutohedralLattice, check_rgb_image
from boxloss.reference.pairwise import dense_crf_energy_lattice_reference, sparse_crf_loss_reference

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


def _check_values_in_python(probs, image, channels) -> None:
    """The compiled kernels check values while they compute; the reference
    fallback checks here, so both raise for NaN, Inf or non-probabilities."""
    if not torch.isfinite(image).all():
        raise ValueError(f"{_FN}: image must be finite, but it contains NaN or Inf")
    x = probs if channels is None else probs[:, channels]
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError(f"{_FN}: probs must hold probabilities in [0, 1], but it contains NaN, Inf or values outside [0, 1]")


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
        warn_fallback(_FN)
        _check_values_in_python(probs, image, channel_list)
        per_image = sparse_crf_loss_reference(
            probs, image, sigma=sigma, neighbourhood=neighbourhood, dilation=dilation,
            valid_mask=valid_mask, kind=kind, channels=channel_list, reduction="none",
        )
    return _checks.reduce_per_image(per_image, reduction)


class SparseCRFLoss(nn.Module):
    """Module form of :func:`sparse_crf_loss`: stores the settings, checks them
    once, and delegates.

    Example:
        >>> crf = boxloss.SparseCRFLoss(sigma=0.15, neighbourhood=8, channels=[1])
        >>> loss = crf(probs, image, valid_mask=valid)
    """

    def __init__(
        self,
        *,
        sigma: float = 0.15,
        neighbourhood: int = 8,
        dilation: int = 1,
        kind: str = "l1",
        channels: Sequence[int] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _FN_M = "SparseCRFLoss"
        self.sigma = _checks.check_positive(_FN_M, "sigma", sigma)
        if isinstance(neighbourhood, bool) or neighbourhood not in NEIGHBOURHOODS:
            raise ValueError(f"{_FN_M}: neighbourhood must be 4 or 8, got {neighbourhood!r}")
        self.neighbourhood = int(neighbourhood)
        self.dilation = _checks.check_int(_FN_M, "dilation", dilation, minimum=1)
        _checks.check_choice(_FN_M, "kind", kind, KINDS)
        _checks.check_choice(_FN_M, "reduction", reduction, _checks.REDUCTIONS)
        self.kind = kind
        self.channels = None if channels is None else list(channels)
        self.reduction = reduction

    def forward(self, probs: torch.Tensor, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_crf_loss(
            probs, image, sigma=self.sigma, neighbourhood=self.neighbourhood, dilation=self.dilation,
            valid_mask=valid_mask, kind=self.kind, channels=self.channels, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma={self.sigma}, neighbourhood={self.neighbourhood}, dilation={self.dilation}, "
            f"kind={self.kind!r}, channels={self.channels}, reduction={self.reduction!r}"
        )


# --------------------------------------------------------------------------- DenseCRF loss

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

    W is applied with the permutohedral lattice (:mod:`boxloss.lattice`, the
    filter Tang et al. use): ``W = (L + L^T)/2 - diag(c)``, the lattice filter
    symmetrised over its two blur orders, minus the self-affinity ``c_i`` the
    lattice is known to give each pixel (a lower bound of its own weight, so
    every entry of W stays >= 0 and ``E >= 0`` exactly).  The loss then
    matches the exact Gaussian (brute force) to about 1-2 % on natural
    images (README table); the lattice's overall scale cancels in ``E / Z``.

    Gradient: :math:`\partial E / \partial S_k = W \mathbf 1 - 2 W S_k` at
    valid pixels (0 elsewhere), divided by ``Z`` when normalised.  ``W 1`` is
    the same for every class, so through a softmax this is Tang's ``-2 W S``.
    The backward reuses the forward's lattice and filters in reverse axis
    order, so the gradient is exact for the op.  No gradient flows to ``image``.

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
        energy, normaliser, _ = torch.ops.boxloss.dense_crf_loss.default(probs, valid_mask, *lattice.tensors)
    else:
        warn_fallback(_DENSE)
        if not ((probs >= 0) & (probs <= 1)).all():
            raise ValueError(f"{_DENSE}: probs must hold probabilities in [0, 1], but it contains NaN, Inf or "
                             "values outside [0, 1]")
        energy, normaliser = dense_crf_energy_lattice_reference(probs.to(compute), valid_mask, lattice.tensors)
        energy, normaliser = energy.to(probs.dtype), normaliser.to(probs.dtype)
    if normalize:
        per_image = torch.where(normaliser > 0, energy / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny),
                                torch.zeros_like(energy))
    else:
        per_image = energy
    return _checks.reduce_per_image(per_image, reduction)


class DenseCRFLoss(nn.Module):
    """Module form of :func:`dense_crf_loss`: stores the settings, checks them once, and delegates.

    Example:
        >>> crf = boxloss.DenseCRFLoss(sigma_rgb=15.0, sigma_xy=80.0, scale_factor=0.5)
        >>> loss = ce + lambda_crf * crf(probs, image_0_255, valid_mask=valid)
    """

    def __init__(
        self,
        *,
        sigma_rgb: float = 15.0,
        sigma_xy: float = 80.0,
        scale_factor: float = 1.0,
        reduction: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        name = "DenseCRFLoss"
        self.sigma_rgb = _checks.check_positive(name, "sigma_rgb", sigma_rgb)
        self.sigma_xy = _checks.check_positive(name, "sigma_xy", sigma_xy)
        self.scale_factor = _checks.check_positive(name, "scale_factor", scale_factor)
        _checks.check_choice(name, "reduction", reduction, _checks.REDUCTIONS)
        if not isinstance(normalize, bool):
            raise TypeError(f"{name}: normalize must be a bool, got {type(normalize).__name__}")
        self.reduction = reduction
        self.normalize = normalize

    def forward(self, probs: torch.Tensor, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        return dense_crf_loss(
            probs, image, sigma_rgb=self.sigma_rgb, sigma_xy=self.sigma_xy, scale_factor=self.scale_factor,
            valid_mask=valid_mask, reduction=self.reduction, normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, scale_factor={self.scale_factor}, "
            f"reduction={self.reduction!r}, normalize={self.normalize}"
        )
