"""Input builders shared by the Sparse-CRF tests (CPU and CUDA)."""

from __future__ import annotations

import torch


def make_inputs(B, C, H, W, *, K=3, dtype=torch.float64, device="cpu", mask_fraction=None, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, C, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    image = torch.rand(B, K, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    mask = None
    if mask_fraction is not None:
        mask = (torch.rand(B, H, W, generator=g) >= mask_fraction).to(device)
    if requires_grad:
        probs.requires_grad_()
    return probs, image, mask


def reference_value_and_grad(probs, image, **kwargs):
    from boxloss.reference import sparse_crf_loss_reference

    x = probs.detach().clone().requires_grad_()
    loss = sparse_crf_loss_reference(x, image, **kwargs)
    if not loss.requires_grad:  # no neighbour pair at all: the loss is a constant 0
        return loss.detach(), torch.zeros_like(x)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def op_value_and_grad(probs, image, **kwargs):
    import boxloss

    x = probs.detach().clone().requires_grad_()
    loss = boxloss.sparse_crf_loss(x, image, **kwargs)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad
