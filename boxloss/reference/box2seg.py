"""Reference Box2Seg losses (Kulharia et al., ECCV 2020, Eq. 1-10): explicit
sums over classes and pixels, and the affinity loss with its full m x m matrix."""

from __future__ import annotations

import torch


def _log(v, eps=1e-8):
    return torch.log(torch.clamp(v, min=eps))


def ce_reference(y, onehot):
    """-(1/m) sum_c sum_i T(i, c) log y(i, c) for one image; y, onehot: (C, H, W)."""
    C, H, W = y.shape
    total = sum(-(onehot[c] * _log(y[c])).sum() for c in range(C))
    return total / (H * W)


def attention_fg_reference(y, a, bx):
    """-sum_{c>=1} sum_i a(i, c) B(i, c) log y(i, c) / sum_i B(i, c), one image."""
    total = y.new_zeros(())
    for c in range(1, y.shape[0]):
        size = bx[c].sum()
        if size > 0:
            total = total - (a[c - 1] * bx[c] * _log(y[c])).sum() / size
    return total


def attention_bg_reference(y, bx):
    size = bx[0].sum()
    return -(bx[0] * _log(y[0])).sum() / size if size > 0 else y.new_zeros(())


def fill_rate_hinge_reference(a, m, bx, gamma=0.7):
    total = a.new_zeros(())
    for c in range(1, bx.shape[0]):
        size = bx[c].sum()
        if size > 0:
            eta = m[c].sum() / size
            eta_p = (bx[c] * a[c - 1]).sum() / size
            total = total + torch.clamp(gamma * eta - eta_p, min=0)
    return total


def affinity_brute_force(embeddings, probs, valid=None):
    """Mean over valid pixel pairs of (A(i, j) - y_i . y_j)^2 with the m x m matrices, one image:
    embeddings (d, H, W), probs (C, H, W)."""
    d = embeddings.shape[0]
    b = embeddings.reshape(d, -1)
    y = probs.reshape(probs.shape[0], -1)
    if valid is not None:
        keep = valid.reshape(-1)
        b, y = b[:, keep], y[:, keep]
    m = b.shape[1]
    if m == 0:
        return probs.sum() * 0
    bn = b / b.norm(dim=0, keepdim=True).clamp_min(1e-12)
    A = bn.t() @ bn
    Y = y.t() @ y
    return ((A - Y) ** 2).sum() / (m * m)
