"""Reference Sparse-CRF loss (Box to Tag and Back, Eq. 1) with shifted slices.

    L_crf(x) = 1/|P| * sum_{(p,q) in N} w_pq * phi(x_p, x_q)
    w_pq     = exp(-||C_p - C_q||^2 / (2 sigma^2))

N holds every unordered pair of 4- or 8-connected neighbours `dilation` pixels
apart, once; P is the set of (valid) pixels.
"""

from __future__ import annotations

import torch


def neighbour_offsets(neighbourhood: int, dilation: int) -> list[tuple[int, int]]:
    """(dy, dx) with q = p + (dy, dx), one per unordered neighbour pair:
    right and down for 4-connectivity, plus down-right and down-left for 8."""
    d = dilation
    offsets = [(0, d), (d, 0)]
    if neighbourhood == 8:
        offsets += [(d, d), (d, -d)]
    return offsets


def _pair_slices(size: int, shift: int) -> tuple[slice, slice]:
    """Slices selecting p and q = p + shift along one axis of length `size`."""
    if shift >= 0:
        return slice(0, max(size - shift, 0)), slice(shift, size)
    return slice(-shift, size), slice(0, max(size + shift, 0))


def sparse_crf_loss_reference(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    sigma: float = 0.15,
    neighbourhood: int = 8,
    dilation: int = 1,
    valid_mask: torch.Tensor | None = None,
    kind: str = "l1",
    channels: list[int] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same arguments and result as boxloss.sparse_crf_loss (no argument checks)."""
    x = probs if channels is None else probs[:, list(channels)]
    B, _, H, W = x.shape
    valid = torch.ones(B, H, W, dtype=torch.bool, device=x.device) if valid_mask is None else valid_mask
    total = x.new_zeros(B)
    for dy, dx in neighbour_offsets(neighbourhood, dilation):
        py, qy = _pair_slices(H, dy)
        px, qx = _pair_slices(W, dx)
        colour_p, colour_q = image[:, :, py, px], image[:, :, qy, qx]
        if colour_p.numel() == 0:
            continue
        w = torch.exp(-((colour_p - colour_q) ** 2).sum(1) / (2 * sigma**2))
        w = w * (valid[:, py, px] & valid[:, qy, qx])
        x_p, x_q = x[:, :, py, px], x[:, :, qy, qx]
        if kind == "l1":
            phi = (x_p - x_q).abs()
        else:  # "potts": x_p (1 - x_q) + x_q (1 - x_p)
            phi = x_p * (1 - x_q) + x_q * (1 - x_p)
        total = total + (w * phi.sum(1)).sum((1, 2))
    count = valid.sum((1, 2)).to(total.dtype)
    per_image = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image
