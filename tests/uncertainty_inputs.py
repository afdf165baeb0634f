"""Input builders shared by the uncertainty-loss tests (CPU and CUDA)."""

from __future__ import annotations

import torch


def make_class_inputs(
    B,
    C,
    H,
    W,
    *,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    mu_scale=2.0,
    log_var_shift=0.0,
    ignore_fraction=0.0,
    box_fraction=None,
    pixel_perfect=None,
    ignore_index=255,
):
    """(mu, log_var, target, box_mask, pixel_perfect) for uncertainty_ce_loss.

    mu ~ N(0, mu_scale^2), log_var ~ N(log_var_shift, 1), targets uniform over
    the classes with a fraction set to ignore_index; box_mask None or random
    with the given fraction of True; pixel_perfect None or a list of bools.
    """
    g = torch.Generator().manual_seed(seed)
    mu = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * mu_scale).to(device=device, dtype=dtype)
    log_var = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + log_var_shift).to(device=device, dtype=dtype)
    target = torch.randint(0, C, (B, H, W), generator=g)
    if ignore_fraction:
        target[torch.rand(B, H, W, generator=g) < ignore_fraction] = ignore_index
    box_mask = None
    if box_fraction is not None:
        box_mask = (torch.rand(B, H, W, generator=g) < box_fraction).to(device)
    pp = None if pixel_perfect is None else torch.tensor(pixel_perfect, dtype=torch.bool, device=device)
    return mu, log_var, target.to(device), box_mask, pp


def make_binary_inputs(
    B,
    H,
    W,
    *,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    mu_scale=2.0,
    log_var_shift=0.5,
    box_fraction=0.6,
    pixel_perfect=None,
    soft=False,
):
    """(mu, log_var, target, box_mask, pixel_perfect) for uncertainty_bce_loss (B, H, W)."""
    g = torch.Generator().manual_seed(seed)
    mu = (torch.randn(B, H, W, generator=g, dtype=torch.float64) * mu_scale).to(device=device, dtype=dtype)
    log_var = (torch.randn(B, H, W, generator=g, dtype=torch.float64) * 1.5 + log_var_shift).to(
        device=device, dtype=dtype
    )
    if soft:
        target = torch.rand(B, H, W, generator=g, dtype=torch.float64)
    else:
        target = (torch.rand(B, H, W, generator=g) < 0.5).to(torch.float64)
    box_mask = None if box_fraction is None else (torch.rand(B, H, W, generator=g) < box_fraction).to(device)
    pp = None if pixel_perfect is None else torch.tensor(pixel_perfect, dtype=torch.bool, device=device)
    return mu, log_var, target.to(device=device, dtype=dtype), box_mask, pp


def value_and_grads(fn, mu, log_var, *args, grad_seed=0, **kwargs):
    """Loss and gradients of sum(loss * random weights) w.r.t. mu and log_var
    (a random upstream gradient exercises per-pixel grad scaling)."""
    x = mu.detach().clone().requires_grad_()
    s = log_var.detach().clone().requires_grad_()
    loss = fn(x, s, *args, **kwargs)
    if loss.dim():
        g = torch.Generator().manual_seed(grad_seed)
        weights = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss)
        total = (loss * weights).sum()
    else:
        total = loss
    if total.requires_grad:
        total.backward()
    grad_mu = x.grad if x.grad is not None else torch.zeros_like(x)
    grad_s = s.grad if s.grad is not None else torch.zeros_like(s)
    return loss.detach(), grad_mu, grad_s
