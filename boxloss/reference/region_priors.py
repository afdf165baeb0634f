"""Reference size and position priors (Box to Tag and Back, Eq. 2, 3, 5, 6 first term),
written per image with explicit pixel sets, as the paper states them."""

from __future__ import annotations

import torch


def _pixels(mask):
    return [(int(i), int(j)) for i, j in mask.nonzero().tolist()]


def _mean_over(x, pixels):
    if not pixels:
        return x.new_zeros(())
    return torch.stack([x[i, j] for i, j in pixels]).mean()


def volumetric_loss_reference(x, *, s_min=0.15, lambda_s=5.0, valid_mask=None):
    """x: (B, H, W).  lambda_s * sum_i [xbar_i < s_min] (xbar_i - s_min)^2 + (mean_i xbar_i - 0.5)^2."""
    sizes = []
    for b in range(x.shape[0]):
        valid = torch.ones_like(x[b], dtype=torch.bool) if valid_mask is None else valid_mask[b]
        if valid.any():
            sizes.append(x[b][valid].mean())
    if not sizes:
        return x.sum() * 0 + 0.25
    small = sum(((s - s_min) ** 2 if s < s_min else s * 0) for s in sizes)
    return lambda_s * small + (torch.stack(sizes).mean() - 0.5) ** 2


def positional_loss_reference(x, *, border_width=3, centre_size=3, border_mask=None, centre_mask=None):
    """x: (B, H, W).  (mean over the border B of x)^2 + (mean over the centre C of x - 1)^2 per image; B and C are
    the image border and centre square, or the given (B, H, W) masks; an empty centre's term is 0."""
    B, H, W = x.shape
    default_border = [
        (i, j)
        for i in range(H)
        for j in range(W)
        if i < border_width or j < border_width or i >= H - border_width or j >= W - border_width
    ]
    r0, c0 = max((H - centre_size) // 2, 0), max((W - centre_size) // 2, 0)
    default_centre = [(i, j) for i in range(r0, min(r0 + centre_size, H)) for j in range(c0, min(c0 + centre_size, W))]
    out = []
    for b in range(B):
        border = default_border if border_mask is None else _pixels(border_mask[b])
        centre = default_centre if centre_mask is None else _pixels(centre_mask[b])
        term = _mean_over(x[b], border) ** 2
        if centre:
            term = term + (_mean_over(x[b], centre) - 1) ** 2
        out.append(term)
    return torch.stack(out)


def negative_loss_reference(x):
    """x: (B, H, W).  1/|P| sum_p x_p^2 per image."""
    return torch.stack([(x[b] ** 2).sum() / x[b].numel() for b in range(x.shape[0])])


def border_background_loss_reference(x, border_mask, *, eps=1e-6):
    """x: (B, H, W).  -1/|B| sum_{p in B} log(max(1 - x_p, eps)) per image, 0 for an empty border."""
    out = []
    for b in range(x.shape[0]):
        pixels = _pixels(border_mask[b])
        terms = [-torch.log(torch.clamp(1 - x[b, i, j], min=eps)) for i, j in pixels]
        out.append(torch.stack(terms).mean() if terms else x.new_zeros(()))
    return torch.stack(out)
