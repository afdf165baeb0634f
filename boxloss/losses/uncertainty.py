r"""The regression loss with label uncertainty and the module forms of the
three uncertainty losses (R. Neven, D. Neven, B. De Brabandere, M. Proesmans
and T. Goedemé, "Weakly-Supervised Semantic Segmentation by Learning Label
Uncertainty", arXiv:2110.05926, 2021, Sec. 3).  The binary and multi-class
losses are fused ops: :mod:`boxloss.ops.uncertainty`, where the log-variance
parametrisation is explained.
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks
from boxloss.ops.uncertainty import (
    IGNORE_INDEX,
    SAMPLES,
    TAU,
    TEMPERATURE,
    _check_binary_args,
    _check_bool,
    _check_finite,
    _check_ignore_index,
    _reduce_valid,
    uncertainty_bce_loss,
    uncertainty_ce_loss,
)

_L2 = "uncertainty_l2_loss"


def uncertainty_l2_loss(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    box_mask: torch.Tensor | None = None,
    *,
    pixel_perfect: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Regression loss with uncertainty (Eq. 2-3 of Neven et al.).

    .. math::
        L = \frac{(y - \mu)^2}{2\sigma^2} + \frac{1}{2}\log\sigma^2
          = \frac{1}{2} e^{-s} (y - \mu)^2 + \frac{s}{2}                                  \quad (2)

    inside ``box_mask`` of images that are not ``pixel_perfect``, and
    ``(y - mu)^2`` elsewhere (Eq. 3's pixel-perfect term).  Computed from
    ``s = log_var`` directly (no ``log(exp(s))``), so it is finite wherever
    ``e^{-s} (y - mu)^2`` is.  Plain PyTorch operations (elementwise, nothing to
    fuse); autograd differentiates both ``mu`` and ``log_var``.  Pixels whose
    target is ``ignore_index`` (255 by default) contribute 0 and no gradient, and
    ``reduction="mean"`` averages over the others, as in :func:`uncertainty_bce_loss`.

    Shape:
        - mu, log_var, target: :math:`(B, H, W)` or :math:`(B, 1, H, W)`, float.
        - box_mask: :math:`(B, H, W)`, bool (None: every pixel).  pixel_perfect: :math:`(B,)`, bool.
        - output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Example:
        >>> mu, log_var = torch.randn(2, 32, 32, requires_grad=True), torch.zeros(2, 32, 32, requires_grad=True)
        >>> target = (torch.rand(2, 32, 32) > 0.5).float()
        >>> boxloss.uncertainty_l2_loss(mu, log_var, target).backward()
    """
    mu, log_var, target, box_mask, pixel_perfect, valid = _check_binary_args(
        _L2, mu, log_var, target, box_mask, pixel_perfect, reduction, ignore_index
    )
    _checks.check_values(
        _L2, mu=(mu, _checks.FINITE), log_var=(log_var, _checks.FINITE), target=(target, _checks.FINITE)
    )
    squared = (target - mu) ** 2
    with_uncertainty = 0.5 * torch.exp(-log_var) * squared + 0.5 * log_var
    uncertain = torch.ones_like(squared, dtype=torch.bool) if box_mask is None else box_mask
    if pixel_perfect is not None:
        uncertain = uncertain & ~pixel_perfect[:, None, None]
    per_pixel = torch.where(uncertain, with_uncertainty, squared)
    return _reduce_valid(per_pixel, valid, reduction)


# ---------------------------------------------------------------- modules


class UncertaintyBCELoss(nn.Module):
    """Module form of :func:`uncertainty_bce_loss`: stores the settings, checks
    them once, and delegates.

    Example:
        >>> criterion = boxloss.UncertaintyBCELoss(tau=2.5)
        >>> loss = criterion(mu, log_var, target, box_mask, pixel_perfect=pp)
    """

    def __init__(
        self,
        *,
        tau: float = TAU,
        temperature: float = TEMPERATURE,
        bootstrap: bool = True,
        route_gradients: bool = True,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        name = "UncertaintyBCELoss"
        self.tau = _check_finite(name, "tau", tau)
        self.temperature = _checks.check_positive(name, "temperature", temperature)
        self.bootstrap = _check_bool(name, "bootstrap", bootstrap)
        self.route_gradients = _check_bool(name, "route_gradients", route_gradients)
        _checks.check_choice(name, "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction
        self.ignore_index = _check_ignore_index(name, ignore_index, binary=True)

    def forward(self, mu, log_var, target, box_mask=None, pixel_perfect=None):
        return uncertainty_bce_loss(
            mu,
            log_var,
            target,
            box_mask,
            tau=self.tau,
            temperature=self.temperature,
            bootstrap=self.bootstrap,
            pixel_perfect=pixel_perfect,
            route_gradients=self.route_gradients,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, temperature={self.temperature}, bootstrap={self.bootstrap}, "
            f"route_gradients={self.route_gradients}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        )


class UncertaintyL2Loss(nn.Module):
    """Module form of :func:`uncertainty_l2_loss`."""

    def __init__(self, *, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        _checks.check_choice("UncertaintyL2Loss", "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction
        self.ignore_index = _check_ignore_index("UncertaintyL2Loss", ignore_index, binary=True)

    def forward(self, mu, log_var, target, box_mask=None, pixel_perfect=None):
        return uncertainty_l2_loss(
            mu,
            log_var,
            target,
            box_mask,
            pixel_perfect=pixel_perfect,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class UncertaintyCELoss(nn.Module):
    """Module form of :func:`uncertainty_ce_loss`.  The noise of each call is
    drawn from ``generator`` (default: torch's global generator) unless a
    ``seed`` is passed to ``forward``.

    Example:
        >>> criterion = boxloss.UncertaintyCELoss(samples=20)
        >>> loss = criterion(mu, log_var, target, box_mask=boxes_as_mask, pixel_perfect=pp)
    """

    def __init__(
        self,
        *,
        samples: int = SAMPLES,
        tau: float = TAU,
        bootstrap: bool = True,
        ignore_index: int = IGNORE_INDEX,
        route_gradients: bool = True,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        name = "UncertaintyCELoss"
        self.samples = _checks.check_int(name, "samples", samples, minimum=1)
        self.tau = _checks.check_positive(name, "tau", tau)
        self.bootstrap = _check_bool(name, "bootstrap", bootstrap)
        self.ignore_index = _check_ignore_index(name, ignore_index)
        self.route_gradients = _check_bool(name, "route_gradients", route_gradients)
        _checks.check_choice(name, "reduction", reduction, _checks.REDUCTIONS)
        self.reduction = reduction
        self.generator = generator

    def forward(self, mu, log_var, target, box_mask=None, pixel_perfect=None, seed=None):
        return uncertainty_ce_loss(
            mu,
            log_var,
            target,
            samples=self.samples,
            seed=seed,
            generator=None if seed is not None else self.generator,
            tau=self.tau,
            bootstrap=self.bootstrap,
            box_mask=box_mask,
            pixel_perfect=pixel_perfect,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            route_gradients=self.route_gradients,
        )

    def extra_repr(self) -> str:
        return (
            f"samples={self.samples}, tau={self.tau}, bootstrap={self.bootstrap}, "
            f"ignore_index={self.ignore_index}, route_gradients={self.route_gradients}, "
            f"reduction={self.reduction!r}"
        )
