r"""Mean-field inference of the fully connected CRF, written from the paper in PyTorch.

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials" (NeurIPS 2011).  The CRF over the labels ``x_i`` of the pixels
of an image has the energy

.. math::
    E(x) = \sum_i \psi_u(x_i) + \sum_{i < j} \mu(x_i, x_j) \sum_k w_k\, k_k(f_i, f_j)

with the unaries :math:`\psi_u` (negative log-probabilities), the Potts
compatibility :math:`\mu(l, l') = [l \ne l']` and two Gaussian kernels:

* appearance (bilateral), on :math:`f = (x / \theta_\alpha, y / \theta_\alpha, I / \theta_\beta)`;
* smoothness, on :math:`f = (x / \theta_\gamma, y / \theta_\gamma)`.

Mean-field inference (the paper's Algorithm 1) starts from
:math:`Q^0_i = \mathrm{softmax}(-\psi_u(\cdot))` and repeats

.. math::
    \tilde Q_i(l) = \sum_k w_k\, m^k_i(l), \qquad
    Q_i(l) = \frac{1}{Z_i} \exp\big(-\psi_u(l) + \tilde Q_i(l)\big),

where :math:`m^k = \tilde K_k Q` is the message of kernel k; with the Potts
model :math:`-\sum_{l'} \mu(l, l') m(l') = m(l) - \sum_{l'} m(l')`, and the sum
over :math:`l'` is the same for every label, so it cancels in the softmax.

The kernel matrix is the one of Krähenbühl's released code (which
``pydensecrf`` wraps) rather than the paper's: the sum over ``j`` includes
``j = i`` (the lattice cannot leave the pixel itself out), and the kernel is
normalised symmetrically (its default ``NORMALIZE_SYMMETRIC``):

.. math::
    \tilde K = D^{-1/2} K D^{-1/2}, \qquad D = \mathrm{diag}(K \mathbf 1 + 10^{-20}).

:func:`dense_crf_inference_reference` computes ``K`` either on the
permutohedral lattice (``kernels="lattice"``: the lattice that the compiled op
and Krähenbühl's code use, 5-d for the appearance kernel and 2-d for the
smoothness kernel) or exactly (``kernels="exact"``: the appearance kernel by
brute force, O(N^2), small images only; the smoothness kernel as the product
of its x and y Gaussians, any size), or one kernel each way.  :func:`permutohedral_lattice_nd` and
:func:`lattice_filter_nd` restate the lattice of Adams, Baek & Davis
(Eurographics 2010) for any feature dimension d, step for step as
:mod:`boxloss.reference.bilateral` does for d = 5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from boxloss.reference.bilateral import lattice_filter_reference, permutohedral_lattice_reference, pixel_features

# --------------------------------------------------------------------------- the lattice in d dimensions


class LatticeND(NamedTuple):
    """The permutohedral lattice of N points in d dimensions.

    splat_index (N, d+1) int64: the simplex vertices of each point (numbered by
    first use in point order); splat_weight (N, d+1): barycentric weights (sum
    1); blur_neighbours (d+1, V, 2) int64: the vertex one step down and one
    step up each lattice axis, -1 where that point is not in the lattice.
    """

    splat_index: torch.Tensor
    splat_weight: torch.Tensor
    blur_neighbours: torch.Tensor

    @property
    def dim(self) -> int:
        return self.splat_index.shape[1] - 1


def _canonical_simplex(d: int) -> torch.Tensor:
    """canonical[r, k]: coordinate k of the remainder-r vertex of the canonical simplex."""
    c = torch.empty(d + 1, d + 1, dtype=torch.long)
    for r in range(d + 1):
        for k in range(d + 1):
            c[r, k] = r if k <= d - r else r - (d + 1)
    return c


def _locate(features: torch.Tensor):
    """Keys (N, d+1, d) of each point's simplex vertices and its barycentric weights (N, d+1)."""
    N, d = features.shape
    # Elevate onto the hyperplane sum = 0 of R^(d+1), scaled so that the
    # [1/2, 1, 1/2] blurs approximate a Gaussian of standard deviation 1 (Adams et al., p. 5-6).
    inv_std_dev = math.sqrt(2.0 / 3.0) * (d + 1)
    elevated = features.new_empty(N, d + 1)
    running = features.new_zeros(N)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * (inv_std_dev / math.sqrt(j * (j + 1)))
        elevated[:, j] = running - j * cf
        running = running + cf
    elevated[:, 0] = running
    # Closest remainder-0 point: every coordinate to the nearest multiple of d+1 (ties down).
    down_factor = 1.0 / (d + 1)
    v = elevated * down_factor
    up = torch.ceil(v) * (d + 1)
    down = torch.floor(v) * (d + 1)
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.round(rem0.sum(1) * down_factor).to(torch.long)
    # Rank of each coordinate of elevated - rem0 in decreasing order (ties to the later index).
    diff = elevated - rem0
    smaller = (diff[:, :, None] < diff[:, None, :]).long()  # [n, i, j]: diff_i < diff_j
    upper = torch.triu(torch.ones(d + 1, d + 1, dtype=torch.long), 1).to(features.device)
    rank = (smaller * upper).sum(2) + ((1 - smaller.transpose(1, 2)) * upper.transpose(0, 1)).sum(2)
    # Bring the point back onto the remainder-0 sublattice's plane.
    rank = rank + total[:, None]
    below, above = rank < 0, rank > d
    rank = torch.where(below, rank + d + 1, torch.where(above, rank - (d + 1), rank))
    rem0 = torch.where(below, rem0 + (d + 1), torch.where(above, rem0 - (d + 1), rem0))
    # Barycentric coordinates (p. 10), coordinate by coordinate in the kernels' order.
    bary = features.new_zeros(N, d + 2)
    v = (elevated - rem0) * down_factor
    for i in range(d + 1):
        bary.scatter_add_(1, d - rank[:, i : i + 1], v[:, i : i + 1])
        bary.scatter_add_(1, d - rank[:, i : i + 1] + 1, -v[:, i : i + 1])
    bary[:, 0] += 1.0 + bary[:, d + 1]
    canonical = _canonical_simplex(d).to(features.device)
    keys = rem0.to(torch.long)[:, None, :d] + canonical[:, None, :].expand(d + 1, N, d + 1).gather(
        2, rank[None, :, :d].expand(d + 1, N, d)
    ).transpose(0, 1)
    return keys, bary[:, : d + 1]


def permutohedral_lattice_nd(features: torch.Tensor) -> LatticeND:
    """The lattice of N points with (N, d) features (already divided by their sigmas)."""
    N, d = features.shape
    keys, weights = _locate(features)
    flat = keys.reshape(N * (d + 1), d)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    position = torch.arange(flat.shape[0], device=flat.device)
    first = torch.full((unique.shape[0],), flat.shape[0], dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    order = torch.argsort(first)
    number = torch.empty_like(order)
    number[order] = torch.arange(order.shape[0], device=order.device)
    vertex_keys = unique[order]
    V = vertex_keys.shape[0]
    # Neighbour along axis j, side 0: key - 1 except key_j + d; side 1: key + 1
    # except key_j - d (for j = d only the implicit last coordinate changes by d).
    lookup = {tuple(k): i for i, k in enumerate(vertex_keys.tolist())}
    neighbours = torch.full((d + 1, V, 2), -1, dtype=torch.long)
    for j in range(d + 1):
        for side, step in ((0, -1), (1, 1)):
            n = vertex_keys + step
            if j < d:
                n[:, j] = vertex_keys[:, j] - step * d
            neighbours[j, :, side] = torch.tensor([lookup.get(tuple(k), -1) for k in n.tolist()], dtype=torch.long)
    return LatticeND(number[inverse].reshape(N, d + 1), weights, neighbours.to(features.device))


def lattice_filter_nd(values: torch.Tensor, lattice: LatticeND, *, reverse: bool = False) -> torch.Tensor:
    """Splat, blur along the d+1 axes (reverse order if ``reverse``), slice, times 1 / (1 + 2^-d).

    values (C, N) -> (C, N).
    """
    d = lattice.dim
    C, N = values.shape
    V = lattice.blur_neighbours.shape[1]
    weight = lattice.splat_weight.to(values.dtype)
    grid = values.new_zeros(V + 1, C)  # row V stands in for absent neighbours
    grid = grid.index_add(
        0, lattice.splat_index.reshape(-1), (weight[:, :, None] * values.t()[:, None, :]).reshape(-1, C)
    )
    nb = torch.where(lattice.blur_neighbours < 0, V, lattice.blur_neighbours)
    for j in range(d, -1, -1) if reverse else range(d + 1):
        blurred = grid[:V] + 0.5 * (grid[nb[j, :, 0]] + grid[nb[j, :, 1]])
        grid = torch.cat([blurred, values.new_zeros(1, C)])
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    return ((weight[:, :, None] * grid[lattice.splat_index]).sum(1) * alpha).t()


def gaussian_filter_brute_force(values: torch.Tensor, features: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
    r""":math:`\mathrm{out}_i = \sum_j \exp(-\lVert f_i - f_j \rVert^2 / 2)\, v_j` (``j = i`` included).

    values (C, N), features (N, d) -> (C, N); O(N^2) time.
    """
    rows = []
    for start in range(0, features.shape[0], chunk):
        diff = features[start : start + chunk, None, :] - features[None, :, :]
        rows.append(values @ torch.exp(-0.5 * (diff * diff).sum(-1)).t())
    return torch.cat(rows, 1)


def gaussian_filter_separable(values: torch.Tensor, height: int, width: int, sigma_xy: float) -> torch.Tensor:
    r"""The exact spatial Gaussian, :math:`\mathrm{out}_i = \sum_j \exp(-\lVert p_i - p_j \rVert^2 / 2\sigma^2) v_j`
    over the whole image (no truncation), as the product of its x and y factors.

    values (C, H*W) -> (C, H*W); O(N (H + W)) time.
    """

    def factor(n):
        t = torch.arange(n, dtype=values.dtype, device=values.device)
        return torch.exp(-0.5 * ((t[:, None] - t[None, :]) / sigma_xy) ** 2)

    v = values.reshape(-1, height, width)
    return (factor(height) @ v @ factor(width)).reshape(values.shape)


def spatial_features(height: int, width: int, sigma_xy: float, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(H*W, 2) features (x / sigma_xy, y / sigma_xy) in row-major pixel order, as the kernels compute them."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    inv = 1.0 / sigma_xy
    return torch.stack([xs * inv, ys * inv], -1).reshape(height * width, 2).to(device)


# --------------------------------------------------------------------------- mean field


def _kernel_filters(image: torch.Tensor, bilateral, gaussian, kernels, dtype):
    """[(weight, filter)] of one (3, H, W) image, filter: (C, N) -> (C, N) = K v."""
    H, W = image.shape[1:]
    filters = []
    w_b, sxy_b, srgb = bilateral
    w_g, sxy_g = gaussian
    appearance_kind, smoothness_kind = kernels
    if w_b > 0:
        if appearance_kind == "lattice":
            lattice = permutohedral_lattice_reference(image[None].to(dtype), sxy_b, srgb)

            def appearance(v, lattice=lattice):
                return lattice_filter_reference(v.reshape(1, -1, H, W), lattice)[0].reshape(v.shape)
        else:
            feats = pixel_features(image[None].to(dtype), sxy_b, srgb)[0]

            def appearance(v, feats=feats):
                return gaussian_filter_brute_force(v, feats)

        filters.append((w_b, appearance))
    if w_g > 0:
        if smoothness_kind == "lattice":
            lattice = permutohedral_lattice_nd(spatial_features(H, W, sxy_g, dtype=dtype, device=image.device))

            def smoothness(v, lattice=lattice):
                return lattice_filter_nd(v, lattice)
        else:

            def smoothness(v):
                return gaussian_filter_separable(v, H, W, sxy_g)

        filters.append((w_g, smoothness))
    return filters


def dense_crf_inference_reference(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    bilateral=(4.0, 55.0, 3.0),
    gaussian=(3.0, 3.0),
    iterations: int = 10,
    valid_mask: torch.Tensor | None = None,
    kernels: str | tuple[str, str] = "lattice",
) -> torch.Tensor:
    r"""Q after ``iterations`` mean-field updates; see the module docstring.

    unary (B, C, H, W) negative log-probabilities (``+inf`` allowed: that label
    gets probability 0); image (B, 3, H, W) colours in [0, 255]; ``bilateral`` =
    (weight, sigma_xy, sigma_rgb), ``gaussian`` = (weight, sigma_xy); a weight
    of 0 drops the kernel.  With ``valid_mask`` (B, H, W) bool, invalid pixels
    neither send messages (their Q is taken as 0 in every filter, the
    normalisation included) nor receive them (they keep :math:`Q^0`).  Runs in
    float64 for float64 unaries, float32 otherwise; returns that dtype.  ``kernels``:
    "lattice", "exact", or a pair (appearance, smoothness) of them; the exact
    appearance kernel is the O(N^2) brute force, the exact smoothness kernel
    the separable Gaussian (fast at any size).
    """
    pair = (kernels, kernels) if isinstance(kernels, str) else tuple(kernels)
    if len(pair) != 2 or any(k not in ("lattice", "exact") for k in pair):
        raise ValueError(
            f"dense_crf_inference_reference: kernels must be 'lattice', 'exact' or a pair of them, got {kernels!r}"
        )
    dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
    B, C, H, W = unary.shape
    out = []
    for b in range(B):
        u = unary[b].to(dtype).reshape(C, H * W)
        valid = torch.ones(H * W, dtype=dtype, device=unary.device)
        if valid_mask is not None:
            valid = valid_mask[b].reshape(H * W).to(dtype)
        filters = _kernel_filters(image[b], bilateral, gaussian, pair, dtype)
        # D^(-1/2) of each kernel, with D = K m (the valid pixels only).
        norms = [1.0 / torch.sqrt(k(valid[None]) + 1e-20) for _, k in filters]
        q0 = torch.softmax(-u, 0)
        q = q0
        for _ in range(iterations):
            logits = -u
            for (w, k), norm in zip(filters, norms):
                logits = logits + w * norm * k(norm * valid * q)
            q = torch.where(valid > 0, torch.softmax(logits, 0), q0)
        out.append(q.reshape(C, H, W))
    return torch.stack(out)


# --------------------------------------------------------------------------- Krähenbühl's code


def pydensecrf_inference(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    bilateral=(4.0, 55.0, 3.0),
    gaussian=(3.0, 3.0),
    iterations: int = 10,
) -> torch.Tensor:
    """Krähenbühl's ``DenseCRF2D`` through ``pydensecrf``, image by image: what the op is compared with.

    unary (B, C, H, W) (run in float32, as pydensecrf does); image (B, 3, H, W)
    uint8, or floats that are rounded and clamped to [0, 255] (pydensecrf takes
    uint8 colours); the kernels as ``addPairwiseGaussian(sxy, compat=w)`` and
    ``addPairwiseBilateral(sxy, srgb, rgbim, compat=w)`` with their default
    ``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``; a kernel of weight 0 is not
    added.  Returns Q (B, C, H, W) float32 on the CPU.  Raises
    :class:`boxloss._pydensecrf.PyDenseCRFUnavailable` (an ImportError) when
    pydensecrf is missing or its build does not run.
    """
    import numpy as np

    from boxloss import _pydensecrf

    dcrf = _pydensecrf.load("pydensecrf_inference")
    pairwise = dict(kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    B, C, H, W = unary.shape
    if image.dtype != torch.uint8:
        image = image.round().clamp(0, 255).to(torch.uint8)
    out = []
    for b in range(B):
        crf = dcrf.DenseCRF2D(W, H, C)
        crf.setUnaryEnergy(np.ascontiguousarray(unary[b].detach().cpu().float().reshape(C, H * W).numpy()))
        if gaussian[0] > 0:
            crf.addPairwiseGaussian(sxy=float(gaussian[1]), compat=float(gaussian[0]), **pairwise)
        if bilateral[0] > 0:
            rgb = np.ascontiguousarray(image[b].detach().cpu().permute(1, 2, 0).numpy())
            crf.addPairwiseBilateral(
                sxy=float(bilateral[1]), srgb=float(bilateral[2]), rgbim=rgb, compat=float(bilateral[0]), **pairwise
            )
        q = np.array(crf.inference(int(iterations)), dtype=np.float32).reshape(C, H, W)
        out.append(torch.from_numpy(q))
    return torch.stack(out)
