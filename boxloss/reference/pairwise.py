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


# --------------------------------------------------------------------------- DenseCRF loss


def _energy_from_filter(S, valid, apply_w):
    """E = sum_k S_k^T W (m - S_k) and Z = m^T W m per image, with S_k, m masked."""
    m = valid[:, None].to(S.dtype)
    x = torch.cat([S * m, m], 1)
    wx = apply_w(x)
    energy = ((S * m) * (wx[:, -1:] - wx[:, :-1])).sum((1, 2, 3))
    normaliser = (m * wx[:, -1:]).sum((1, 2, 3))
    return energy, normaliser


def _reduce(energy, normaliser, normalize, reduction):
    if normalize:
        per_image = torch.where(
            normaliser > 0, energy / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny), torch.zeros_like(energy)
        )
    else:
        per_image = energy
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def dense_crf_loss_reference(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 80.0,
    valid_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """The DenseCRF loss with the exact Gaussian affinity (brute force, O((HW)^2)): the truth the op approximates.

    W x = K x - x, K the exact bilateral kernel including the pixel itself
    (boxloss.reference.bilateral.bilateral_filter_brute_force): W_ii = 0.
    Same arguments and result as boxloss.dense_crf_loss at scale_factor=1 (no
    argument checks); for another scale, pass the resized inputs and sigma_xy
    times the scale.
    """
    from boxloss.reference.bilateral import bilateral_filter_brute_force

    B, _, H, W = probs.shape
    valid = torch.ones(B, H, W, dtype=torch.bool, device=probs.device) if valid_mask is None else valid_mask
    energy, normaliser = _energy_from_filter(
        probs, valid, lambda x: bilateral_filter_brute_force(x, image, sigma_xy, sigma_rgb) - x
    )
    return _reduce(energy, normaliser, normalize, reduction)


def dense_crf_energy_lattice_reference(probs, valid_mask, lattice):
    """(E, Z) per image with the op's lattice affinity W = (L + L^T)/2 - diag(c), in PyTorch.

    ``lattice`` is the tuple (splat_index, splat_weight, blur_neighbours, vertex_offsets).

    L is boxloss.reference.bilateral.lattice_filter_reference (its transpose
    the reverse blur order) and c the self-affinity lower bound of each pixel.
    An image with fewer than two valid pixels has no pair: E = Z = 0 (the
    residual self-affinity L_ii - c_i would otherwise pair a lone pixel with
    itself).  Differentiable in probs; the op matches it at 1e-6 relative in float64.
    """
    from boxloss.reference.bilateral import lattice_filter_reference, self_affinity_lower_bound

    B, _, H, W = probs.shape
    valid = torch.ones(B, H, W, dtype=torch.bool, device=probs.device) if valid_mask is None else valid_mask
    c = self_affinity_lower_bound(lattice[1].to(probs.dtype)).reshape(B, 1, H, W)

    def apply_w(x):
        forward = lattice_filter_reference(x, lattice)
        transpose = lattice_filter_reference(x, lattice, reverse=True)
        return 0.5 * (forward + transpose) - c * x

    energy, normaliser = _energy_from_filter(probs, valid, apply_w)
    paired = valid.flatten(1).sum(1) >= 2
    return torch.where(paired, energy, torch.zeros_like(energy)), torch.where(
        paired, normaliser, torch.zeros_like(normaliser)
    )


def dense_crf_loss_lattice_reference(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 80.0,
    valid_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """boxloss.dense_crf_loss written in PyTorch on the reference lattice (same arguments and result at
    scale_factor=1; for another scale, pass the resized inputs and sigma_xy times the scale)."""
    from boxloss.reference.bilateral import permutohedral_lattice_reference

    lattice = permutohedral_lattice_reference(image.to(probs.dtype), sigma_xy, sigma_rgb)
    energy, normaliser = dense_crf_energy_lattice_reference(probs, valid_mask, lattice)
    return _reduce(energy, normaliser, normalize, reduction)
