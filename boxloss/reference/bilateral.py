r"""Reference bilateral filters: the exact Gaussian by brute force, and the
permutohedral lattice of Adams et al. (2010) written step by step in PyTorch.

Features of pixel ``i = (y, x)`` of an RGB image ``I`` (colours in the units of
``sigma_rgb``, [0, 255] in the DenseCRF papers):

.. math::
    f_i = (x / \sigma_{xy},\; y / \sigma_{xy},\; I^r_i / \sigma_{rgb},\; I^g_i / \sigma_{rgb},\; I^b_i / \sigma_{rgb})

* :func:`bilateral_filter_brute_force` computes
  :math:`\mathrm{out}_i = \sum_j \exp(-\lVert f_i - f_j \rVert^2 / 2)\, v_j`
  (the pixel itself included, weight 1) with an (N, N) kernel, chunked: O(N^2)
  time, for small images only.  It is the truth the lattice approximates.
* :func:`permutohedral_lattice_reference` and :func:`lattice_filter_reference`
  are the lattice the compiled ops build and filter with, vectorised over
  pixels: the same elevation, rounding, ranking, barycentric weights, vertex
  numbering (first use in pixel order), blur and scaling as the kernels and as
  Krähenbühl's ``permutohedral.cpp`` that Tang et al. use.  The kernels are
  tested against it at 1e-6 relative in float64; it is also the fallback when
  the compiled ops are unavailable.

The lattice in brief.  Scaled features are lifted onto the hyperplane
``sum = 0`` of R^(d+1) (d = 5); the lattice points there are the integer
vectors whose coordinates are congruent mod d+1.  Each pixel lies in one simplex
of d+1 lattice points (found by rounding to the nearest "remainder-0" point and
sorting the differences); it is splatted onto them with its barycentric
weights, the values are blurred with [1/2, 1, 1/2] along each of the d+1
lattice directions, then sliced back with the same weights and scaled by
``alpha = 1 / (1 + 2^-d)``, which makes a point sitting on a lattice vertex
keep weight 1 for itself.  The feature scaling ``sqrt(2/3) (d+1)`` makes the
whole splat-blur-slice approximate a Gaussian of standard deviation 1 in
feature space, i.e. the brute-force kernel above.  Only the lattice points some
pixel touches exist (a hash table), so the blur is truncated at the edge of the
occupied region; each 1-D blur is symmetric, but their product is not, and
the exact transpose of the filter blurs in the reverse axis order
(``reverse=True``).
"""

from __future__ import annotations

import math

import torch

D = 5  # feature dimension: x, y, r, g, b
ALPHA = 1.0 / (1.0 + 2.0 ** (-D))
INV_STD_DEV = math.sqrt(2.0 / 3.0) * (D + 1)
SCALE_FACTORS = [INV_STD_DEV / math.sqrt((i + 1) * (i + 2)) for i in range(D)]


# --------------------------------------------------------------------------- features


def pixel_features(image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    """(B, H*W, 5) features (x/sigma_xy, y/sigma_xy, rgb/sigma_rgb) of a (B, 3, H, W) image,
    in the image's dtype (float16/bfloat16 in float32), computed as the kernels do."""
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    B, _, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    inv_xy = 1.0 / sigma_xy
    inv_rgb = 1.0 / sigma_rgb
    position = torch.stack([xs * inv_xy, ys * inv_xy], -1).reshape(1, H * W, 2).to(image.device)
    colour = image.to(dtype).reshape(B, 3, H * W).transpose(1, 2) * inv_rgb
    return torch.cat([position.expand(B, -1, -1), colour], -1)


# --------------------------------------------------------------------------- brute force


def bilateral_filter_brute_force(
    values: torch.Tensor, image: torch.Tensor, sigma_xy: float, sigma_rgb: float, *, chunk: int = 512
) -> torch.Tensor:
    r"""Exact Gaussian bilateral filter, :math:`\mathrm{out}_i = \sum_j e^{-\lVert f_i - f_j\rVert^2/2} v_j`.

    values (B, C, H, W), image (B, 3, H, W) -> (B, C, H, W).  The self term
    (weight 1) is included.  O((H W)^2) time; differentiable in ``values``.
    """
    B, C, H, W = values.shape
    feats = pixel_features(image, sigma_xy, sigma_rgb).to(values.dtype)
    v = values.reshape(B, C, H * W)
    out = []
    for b in range(B):
        f = feats[b]
        rows = []
        for start in range(0, H * W, chunk):
            diff = f[start : start + chunk, None, :] - f[None, :, :]
            kernel = torch.exp(-0.5 * (diff * diff).sum(-1))  # (chunk, N)
            rows.append(v[b] @ kernel.transpose(0, 1))  # (C, chunk)
        out.append(torch.cat(rows, 1))
    return torch.stack(out).reshape(B, C, H, W)


# --------------------------------------------------------------------------- lattice


def _canonical_simplex() -> torch.Tensor:
    """canonical[r, k]: coordinate k of the remainder-r vertex of the canonical simplex."""
    c = torch.empty(D + 1, D + 1, dtype=torch.long)
    for r in range(D + 1):
        for k in range(D + 1):
            c[r, k] = r if k <= D - r else r - (D + 1)
    return c


def _locate(features: torch.Tensor):
    """Per pixel: the keys (N, d+1 remainders, d) of its simplex's vertices and the
    barycentric weights (N, d+1), with the operations of the kernels in their order."""
    N = features.shape[0]
    dtype = features.dtype
    # Elevate onto the hyperplane: E f with the diagonal scaling of Adams et al. (p. 5).
    elevated = features.new_empty(N, D + 1)
    running = features.new_zeros(N)
    for j in range(D, 0, -1):
        cf = features[:, j - 1] * SCALE_FACTORS[j - 1]
        elevated[:, j] = running - j * cf
        running = running + cf
    elevated[:, 0] = running
    # Closest remainder-0 point: each coordinate to the nearest multiple of d+1 (ties down).
    down_factor = 1.0 / (D + 1)
    v = elevated * down_factor
    up = torch.ceil(v) * (D + 1)
    down = torch.floor(v) * (D + 1)
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.round(rem0.sum(1) * down_factor).to(torch.long)  # an exact integer
    # Rank of each coordinate of elevated - rem0 (descending; ties go to the later index).
    diff = elevated - rem0
    greater = (diff[:, :, None] < diff[:, None, :]).long()  # [n, i, j]: diff_i < diff_j
    upper = torch.triu(torch.ones(D + 1, D + 1, dtype=torch.long), 1)
    lower = upper.transpose(0, 1)
    rank = (greater * upper).sum(2) + ((1 - greater.transpose(1, 2)) * lower).sum(2)
    # Bring the point back onto the hyperplane's remainder-0 sublattice.
    rank = rank + total[:, None]
    below = rank < 0
    above = rank > D
    rank = torch.where(below, rank + D + 1, torch.where(above, rank - (D + 1), rank))
    rem0 = torch.where(below, rem0 + (D + 1), torch.where(above, rem0 - (D + 1), rem0))
    # Barycentric coordinates (p. 10).
    bary = features.new_zeros(N, D + 2)
    v = (elevated - rem0) * down_factor
    for i in range(D + 1):  # coordinate by coordinate, as the kernels add them
        bary.scatter_add_(1, D - rank[:, i : i + 1], v[:, i : i + 1])
        bary.scatter_add_(1, D - rank[:, i : i + 1] + 1, -v[:, i : i + 1])
    bary[:, 0] += 1.0 + bary[:, D + 1]
    weights = bary[:, : D + 1].to(dtype)
    canonical = _canonical_simplex().to(features.device)
    rem0_int = rem0.to(torch.long)
    keys = rem0_int[:, None, :D] + canonical[:, None, :].expand(D + 1, N, D + 1).gather(
        2, rank[None, :, :D].expand(D + 1, N, D)
    ).transpose(0, 1)
    return keys, weights  # keys (N, d+1, d)


def _encode(keys: torch.Tensor, low: torch.Tensor, base: int) -> torch.Tensor:
    code = torch.zeros(keys.shape[:-1], dtype=torch.long, device=keys.device)
    for i in range(D):
        code = code * base + (keys[..., i] - low[i])
    return code


def _lattice_of_image(features: torch.Tensor):
    N = features.shape[0]
    keys, weights = _locate(features)
    flat = keys.reshape(N * (D + 1), D)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    position = torch.arange(flat.shape[0], device=flat.device)
    first = torch.full((unique.shape[0],), flat.shape[0], dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    order = torch.argsort(first)  # vertices numbered by first use, as the kernels' hash table does
    number = torch.empty_like(order)
    number[order] = torch.arange(order.shape[0], device=order.device)
    splat_index = number[inverse].reshape(N, D + 1)
    vertex_keys = unique[order]
    V = vertex_keys.shape[0]
    # Neighbours along each axis j: key + e_j and key - e_j, e_j = (d+1) unit_j - 1
    # (e_d has no stored coordinate: key - 1 and key + 1).
    low = vertex_keys.min(0).values - (D + 1)
    base = int((vertex_keys.max(0).values - low).max()) + D + 2
    if base**D >= 2**62:
        raise ValueError("permutohedral_lattice_reference: features span too large a range for the reference")
    codes = _encode(vertex_keys, low, base)
    sorted_codes, sorted_to_vertex = torch.sort(codes)
    neighbours = torch.empty(V, D + 1, 2, dtype=torch.long, device=features.device)
    for j in range(D + 1):
        for side, sign in ((0, 1), (1, -1)):
            n = vertex_keys - sign
            if j < D:
                n[:, j] = vertex_keys[:, j] + sign * D
            c = _encode(n, low, base)
            at = torch.searchsorted(sorted_codes, c).clamp_max(V - 1)
            found = sorted_codes[at] == c
            neighbours[:, j, side] = torch.where(found, sorted_to_vertex[at], torch.full_like(at, -1))
    return splat_index.to(torch.int32), weights, neighbours.transpose(0, 1).to(torch.int32)


def permutohedral_lattice_reference(image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> tuple:
    """The lattice of each image of a (B, 3, H, W) batch as the tuple (splat_index, splat_weight,
    blur_neighbours, vertex_offsets), in the layout of ``torch.ops.boxloss.permutohedral_lattice``
    (described by ``boxloss.ops.lattice.LatticeTensors``).  Weights are float64 for a float64
    image and float32 otherwise."""
    feats = pixel_features(image, sigma_xy, sigma_rgb)
    index, weight, neighbours, counts = [], [], [], [0]
    for b in range(image.shape[0]):
        i, w, n = _lattice_of_image(feats[b])
        index.append(i)
        weight.append(w)
        neighbours.append(n)
        counts.append(n.shape[1])
    offsets = torch.tensor(counts, dtype=torch.long, device=image.device).cumsum(0)
    return torch.stack(index), torch.stack(weight), torch.cat(neighbours, 1), offsets


def lattice_filter_reference(values: torch.Tensor, lattice, *, reverse: bool = False) -> torch.Tensor:
    """Splat, blur along the d+1 axes (in reverse order when ``reverse``), slice, times alpha.

    values (B, C, H, W) -> (B, C, H, W); differentiable in ``values``.  ``lattice`` is the tuple
    (splat_index, splat_weight, blur_neighbours, vertex_offsets) of :func:`permutohedral_lattice_reference`.
    """
    splat_index, splat_weight, blur_neighbours, vertex_offsets = lattice
    B, C, H, W = values.shape
    out = []
    for b in range(B):
        begin, end = int(vertex_offsets[b]), int(vertex_offsets[b + 1])
        V = end - begin
        index = splat_index[b].long()  # (N, d+1)
        weight = splat_weight[b].to(values.dtype)
        nb = blur_neighbours[:, begin:end].long()  # (d+1, V, 2)
        nb = torch.where(nb < 0, torch.full_like(nb, V), nb)  # row V is a zero row
        v = values[b].reshape(C, H * W).transpose(0, 1)  # (N, C)
        grid = values.new_zeros(V + 1, C)
        grid = grid.index_add(0, index.reshape(-1), (weight[:, :, None] * v[:, None, :]).reshape(-1, C))
        axes = range(D, -1, -1) if reverse else range(D + 1)
        for j in axes:
            padded = grid
            blurred = padded[:V] + 0.5 * (padded[nb[j, :, 0]] + padded[nb[j, :, 1]])
            grid = torch.cat([blurred, values.new_zeros(1, C)])
        sliced = (weight[:, :, None] * grid[index]).sum(1) * ALPHA  # (N, C)
        out.append(sliced.transpose(0, 1).reshape(C, H, W))
    return torch.stack(out)


def original_lattice_filter(
    values: torch.Tensor, image: torch.Tensor, sigma_xy: float, sigma_rgb: float
) -> torch.Tensor:
    """Krähenbühl's ``permutohedral.cpp`` (the lattice DenseCRF and Tang et al. use) through ``pydensecrf``.

    values (C, H, W), image (3, H, W); returns the raw (unnormalised) filter
    output (C, H, W) in float64.  pydensecrf exposes no filter, so this runs
    one mean-field step of a CRF whose only pairwise term is the raw lattice
    filter, with a dummy label 0 of compatibility 0, so that
    ``log(Q1_k / Q1_0) - log(Q0_k / Q0_0)`` is exactly the filter output of
    channel k.  Values must be positive.  Raises
    :class:`boxloss._pydensecrf.PyDenseCRFUnavailable` (an ImportError) when
    pydensecrf is missing or its build does not run.
    """
    import numpy as np

    from boxloss import _pydensecrf

    pydensecrf = _pydensecrf.load("original_lattice_filter")

    C, H, W = values.shape
    feats = pixel_features(image[None].float(), sigma_xy, sigma_rgb)[0].numpy().T.copy().astype(np.float32)
    v = values.reshape(C, -1).numpy()
    Z = 2 * v.sum(0).max()
    p = np.concatenate([1 - v.sum(0, keepdims=True) / Z, v / Z]).astype(np.float32)
    crf = pydensecrf.DenseCRF(H * W, C + 1)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(p)))
    compat = np.array([0.0] + [-1.0] * C, dtype=np.float32)
    crf.addPairwiseEnergy(
        feats, compat=compat, kernel=pydensecrf.DIAG_KERNEL, normalization=pydensecrf.NO_NORMALIZATION
    )
    q = np.array(crf.inference(1)).astype(np.float64)
    out = (np.log(q[1:] / q[:1]) - np.log(p[1:].astype(np.float64) / p[:1])) * Z
    return torch.from_numpy(out.reshape(C, H, W))


def self_affinity_lower_bound(splat_weight: torch.Tensor) -> torch.Tensor:
    r"""The part of the lattice's own-pixel weight :math:`L_{ii}` that every lattice has.

    :math:`L_{ii} = \alpha \sum_{a,b} w_a w_b G(v_a, v_b)` over the pixel's simplex
    vertices, ``G`` the blur.  Staying put through all d+1 blur passes gives
    ``G(v, v) >= 1``, and cyclically adjacent vertices of a simplex differ by one
    lattice axis, so one step along it gives ``G >= 1/2`` with both ends in the
    lattice.  Hence :math:`L_{ii} \ge c_i = \alpha (\sum_a w_a^2 + \sum_a w_a w_{a+1 \bmod d+1})`;
    the other paths need lattice points that may be missing.  (..., d+1) -> (...).
    """
    w = splat_weight
    return ALPHA * ((w * w).sum(-1) + (w * torch.roll(w, -1, dims=-1)).sum(-1))
