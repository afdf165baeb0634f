"""Module forms of the pairwise (CRF) regularisers on probability maps: the
Sparse-CRF loss on a local neighbourhood (:func:`boxloss.sparse_crf_loss`) and
the DenseCRF loss on the permutohedral lattice (:func:`boxloss.dense_crf_loss`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from boxloss import _checks
from boxloss.ops.dense_crf import dense_crf_loss
from boxloss.ops.sparse_crf import KINDS, NEIGHBOURHOODS, sparse_crf_loss


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
            probs,
            image,
            sigma=self.sigma,
            neighbourhood=self.neighbourhood,
            dilation=self.dilation,
            valid_mask=valid_mask,
            kind=self.kind,
            channels=self.channels,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma={self.sigma}, neighbourhood={self.neighbourhood}, dilation={self.dilation}, "
            f"kind={self.kind!r}, channels={self.channels}, reduction={self.reduction!r}"
        )


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
            probs,
            image,
            sigma_rgb=self.sigma_rgb,
            sigma_xy=self.sigma_xy,
            scale_factor=self.scale_factor,
            valid_mask=valid_mask,
            reduction=self.reduction,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, scale_factor={self.scale_factor}, "
            f"reduction={self.reduction!r}, normalize={self.normalize}"
        )
