"""Reference uncertainty losses (Neven et al., "Weakly-Supervised Semantic
Segmentation by Learning Label Uncertainty", arXiv:2110.05926, Sec. 3),
written equation by equation.

The binary losses use the variance ``sigma^2 = exp(log_var)`` exactly as the
paper writes it; the multi-class loss materialises all T x B x C x H x W
logit samples and keeps them for backward, the way public PyTorch code does.
With ``noise=None`` it draws the fused kernel's own Philox noise
(:func:`boxloss.reference.philox.philox_normal`), so the two can be compared
exactly; ``noise="torch"`` draws it with ``torch.randn`` instead (the usual
way, and the benchmark's baseline).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boxloss.reference.philox import philox_normal


def _bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 5 with the sign of a loss: -(y log p + (1 - y) log(1 - p))."""
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def _uncertain(shape, box_mask, pixel_perfect, device) -> torch.Tensor:
    B, H, W = shape
    inside = torch.ones(B, H, W, dtype=torch.bool, device=device) if box_mask is None else box_mask
    if pixel_perfect is not None:
        inside = inside & ~pixel_perfect[:, None, None]
    return inside


def _reduce(per_pixel: torch.Tensor, reduction: str, count=None) -> torch.Tensor:
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    if count is None:
        return per_pixel.mean()
    return per_pixel.sum() / count.clamp_min(1)


def uncertainty_bce_loss_reference(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    box_mask: torch.Tensor | None = None,
    *,
    tau: float = 2.5,
    temperature: float = 0.2,
    bootstrap: bool = True,
    pixel_perfect: torch.Tensor | None = None,
    route_gradients: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same arguments and result as boxloss.uncertainty_bce_loss, (B, H, W) inputs."""
    var = torch.exp(log_var)
    route = bootstrap and route_gradients
    mu_u = mu.detach() if route else mu
    expected_p = torch.sigmoid(mu_u / torch.sqrt(1 + math.pi * var / 8))  # Eq. 8
    loss_u = _bce(expected_p, target)  # Eq. 9
    plain = _bce(torch.sigmoid(mu), target)
    if bootstrap:
        w = torch.sigmoid((tau - (var.detach() if route else var)) / temperature)  # Eq. 11
        p = torch.sigmoid(mu)
        loss_b = w * _bce(p, target) + (1 - w) * _bce(p, 1 - target)  # Eq. 10, y* = 1 - y
        loss_in_box = loss_u + loss_b
    else:
        loss_in_box = loss_u
    uncertain = _uncertain(mu.shape, box_mask, pixel_perfect, mu.device)
    return _reduce(torch.where(uncertain, loss_in_box, plain), reduction)


def uncertainty_l2_loss_reference(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    box_mask: torch.Tensor | None = None,
    *,
    pixel_perfect: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eq. 2 inside boxes of box-labelled images, Eq. 3's (y - mu)^2 elsewhere."""
    var = torch.exp(log_var)
    with_uncertainty = (target - mu) ** 2 / (2 * var) + 0.5 * torch.log(var)  # Eq. 2
    plain = (target - mu) ** 2  # Eq. 3, first term
    uncertain = _uncertain(mu.shape, box_mask, pixel_perfect, mu.device)
    return _reduce(torch.where(uncertain, with_uncertainty, plain), reduction)


def uncertainty_ce_loss_reference(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    *,
    samples: int = 20,
    seed: int = 0,
    offset: int = 0,
    noise: torch.Tensor | str | None = None,
    generator: torch.Generator | None = None,
    tau: float = 2.5,
    bootstrap: bool = True,
    box_mask: torch.Tensor | None = None,
    pixel_perfect: torch.Tensor | None = None,
    ignore_index: int = 255,
    reduction: str = "mean",
    route_gradients: bool = True,
) -> torch.Tensor:
    """Same result as boxloss.uncertainty_ce_loss with the same (seed, offset).

    ``noise``: None (the kernel's Philox noise for ``seed``, ``offset``),
    ``"torch"`` (``torch.randn`` with ``generator``), or a (T, B, C, H, W) tensor.
    """
    B, C, H, W = mu.shape
    T = samples
    if noise is None:
        eps = philox_normal(seed, offset, T, B, C, H, W, dtype=mu.dtype, device=mu.device)
    elif isinstance(noise, str):
        eps = torch.randn((T, B, C, H, W), generator=generator, dtype=mu.dtype, device=mu.device)
    else:
        eps = noise
    route = bootstrap and route_gradients
    sigma = torch.exp(0.5 * log_var)
    logits = (mu.detach() if route else mu) + sigma * eps  # Eq. 14: l_t = mu + sigma eps_t
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    log_p = logits.log_softmax(2)
    log_p_y = log_p.gather(2, y[None, :, None].expand(T, B, 1, H, W)).squeeze(2)  # (T, B, H, W)
    # Eq. 13-15: -log of the mean over samples of softmax(l_t)_y, as a log-sum-exp.
    loss_u = math.log(T) - torch.logsumexp(log_p_y, 0)
    plain = F.cross_entropy(mu, y, reduction="none")
    if bootstrap:
        # Eq. 16: flip to the arg-max of mu where max_c sigma_c^2 > tau (the
        # same test in log space), lowest index among equal maxima.
        flip = log_var.detach().amax(1) > math.log(tau)
        y_star = torch.where(flip, mu.detach().argmax(1), y)
        loss_in_box = loss_u + F.cross_entropy(mu, y_star, reduction="none")
    else:
        loss_in_box = loss_u
    uncertain = _uncertain((B, H, W), box_mask, pixel_perfect, mu.device) & valid
    loss = torch.where(uncertain, loss_in_box, plain)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, reduction, valid.sum())
