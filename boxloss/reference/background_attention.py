r"""Background attention and background-aware pooling (BANA, Oh et al., CVPR 2021,
Eq. 1-4), written from the equations with loops over images, grid cells and
boxes: the oracle of the fused ops' tests and the baseline of their benchmark.

- Definite background M: the pixels in no box (the box convention of
  :mod:`boxloss.reference.boxes`), or ``bg_mask``.
- Cell j of the N x N grid: rows ``[floor(i h / N), floor((i + 1) h / N))`` x
  columns likewise; ``q_j`` the mean of f over the cell's background (Eq. 1),
  invalid when the cell has none.
- ``A(p)`` inside a box: the mean over valid j of
  ``clamp(cos(f(p), q_j), 0, 1)`` (Eq. 2-3; each norm clamped at 1e-8), 1
  outside every box; an image whose background fraction is below
  ``min_background``, or without a valid cell, has A = 0 inside its boxes.
- Pooling (Eq. 4): per box and bin, the (1 - A)-weighted mean of f; bin i of S
  over a covered span ``[b, b + n)`` is ``[b + floor(i n / S), b + ceil((i + 1) n / S))``;
  a bin whose weight sum is not positive takes the plain mean; an empty box pools 0.
"""

from __future__ import annotations

import math

import torch

from boxloss.reference.boxes import box_pixel_ranges, check_box

EPS = 1e-8


def _inside(boxes, box_batch, B, h, w, spatial_scale, fn):
    inside = torch.zeros(B, h, w, dtype=torch.bool)
    ranges = []
    for k, (box, b) in enumerate(zip(boxes.tolist(), box_batch.tolist())):
        check_box(fn, k, box, b, 0, B, 1)
        rows, cols = box_pixel_ranges(box, spatial_scale, h, w)
        ranges.append((rows, cols))
        if len(rows):
            inside[b, rows.start : rows.stop, cols.start : cols.stop] = True
    return inside, ranges


def _unit_clamp(c):
    # clamp(c, 0, 1) with subgradient 0 at both ends, as the kernels.
    return torch.where(c > 0, torch.where(c < 1, c, torch.ones_like(c)), torch.zeros_like(c))


def background_attention_reference(
    features, boxes, box_batch, *, grid_size=4, spatial_scale=1.0, bg_mask=None, min_background=0.125
):
    """(attention (B, h, w), queries (B, N*N, D), valid (B, N*N), fallback (B,))."""
    fn = "background_attention"
    B, D, h, w = features.shape
    if torch.isnan(features).any() or torch.isinf(features).any():
        raise ValueError(f"{fn}: features must be finite, but it holds NaN or infinite values")
    inside, _ = _inside(boxes, box_batch, B, h, w, spatial_scale, fn)
    inside = inside.to(features.device)
    background = bg_mask.to(torch.bool) if bg_mask is not None else ~inside
    N = grid_size
    row_cells = [(math.floor(i * h / N), math.floor((i + 1) * h / N)) for i in range(N)]
    col_cells = [(math.floor(i * w / N), math.floor((i + 1) * w / N)) for i in range(N)]
    attentions, all_queries, all_valid, all_fallback = [], [], [], []
    for b in range(B):
        f = features[b]
        queries, valid = [], []
        for r0, r1 in row_cells:
            for c0, c1 in col_cells:
                m = background[b, r0:r1, c0:c1].to(f.dtype)
                count = m.sum()
                if count > 0:
                    queries.append((f[:, r0:r1, c0:c1] * m).sum((1, 2)) / count)
                    valid.append(True)
                else:
                    queries.append(f.new_zeros(D))
                    valid.append(False)
        fraction = background[b].to(torch.float64).mean().item()
        fallback = fraction < min_background or not any(valid)
        f_norm = f.norm(dim=0).clamp_min(EPS)
        if fallback:
            inner = f.new_zeros(h, w)
        else:
            sims = []
            for q, v in zip(queries, valid):
                if v:
                    cos = (f * q[:, None, None]).sum(0) / (f_norm * q.norm().clamp_min(EPS))
                    sims.append(_unit_clamp(cos))
            inner = torch.stack(sims).mean(0)
        attentions.append(torch.where(inside[b], inner, torch.ones_like(inner)))
        all_queries.append(torch.stack(queries))
        all_valid.append(torch.tensor(valid, dtype=torch.bool))
        all_fallback.append(fallback)
    return (
        torch.stack(attentions),
        torch.stack(all_queries),
        torch.stack(all_valid).to(features.device),
        torch.tensor(all_fallback, dtype=torch.bool, device=features.device),
    )


def background_aware_pool_reference(features, attention, boxes, box_batch, *, output_size=1, spatial_scale=1.0):
    """(K, D, S, S): per box and bin the (1 - A)-weighted mean of the features (Eq. 4)."""
    fn = "background_aware_pool"
    B, D, h, w = features.shape
    S = output_size
    _, ranges = _inside(boxes, box_batch, B, h, w, spatial_scale, fn)
    out = []
    for (rows, cols), b in zip(ranges, box_batch.tolist()):
        pooled = features.new_zeros(D, S, S)
        if len(rows):
            nr, nc = len(rows), len(cols)
            bins = []
            for i in range(S):
                r0, r1 = rows.start + (i * nr) // S, rows.start + -(-((i + 1) * nr) // S)
                row = []
                for j in range(S):
                    c0, c1 = cols.start + (j * nc) // S, cols.start + -(-((j + 1) * nc) // S)
                    f = features[b, :, r0:r1, c0:c1]
                    weight = 1 - attention[b, r0:r1, c0:c1]
                    total = weight.sum()
                    if total > 0:
                        row.append((f * weight).sum((1, 2)) / total)
                    else:
                        row.append(f.mean((1, 2)))
                bins.append(torch.stack(row, -1))
            pooled = torch.stack(bins, -2)
        out.append(pooled)
    if not out:
        return features.new_zeros(0, D, S, S)
    return torch.stack(out)
