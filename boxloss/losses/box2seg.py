r"""Box2Seg losses (Kulharia et al., ECCV 2020, Sec. 3.2-3.5).

Notation of the paper: ``y`` (B, L+1, H, W) segmentation probabilities
(softmax, channel 0 the background); ``alpha`` (B, L, H, W) class attention
maps (sigmoid, channel c-1 for class c); ``Bx`` the box-segmentation tensor of
:func:`boxloss.boxes_to_masks` (one-hot, smaller box in front); ``M`` a pseudo
ground truth (e.g. GrabCut per box, merged) as a (B, H, W) label map with void
255 or a one-hot tensor.  Sums run over the m pixels of each image; every loss
returns one value per image before its ``reduction`` ("mean" over images,
"sum", or "none" for (B,)).  Logarithms clamp their argument at ``eps`` so no
loss is infinite.

Values: ``y``, ``alpha`` and one-hot (or soft) targets must lie in [0, 1]
(NaN, Inf and logits raise ValueError), embeddings must be finite, label maps
hold labels in [0, C) or the void label.  These are eager-mode checks (one
min/max pass per tensor and one device-to-host copy per call); inside
``torch.compile`` they are skipped, since a compiled graph cannot branch on
values.  The total loss of Eq. 11 is :class:`boxloss.Box2SegLoss`
(:mod:`boxloss.recipes.box2seg`).
"""

from __future__ import annotations

import torch
from torch import nn

from boxloss import _checks


def _probs(fn, name, x, channels=None):
    _checks.check_tensor(fn, name, x, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(fn, name, x)
    if 0 in x.shape:
        raise ValueError(f"{fn}: {name} must be non-empty, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{fn}: {name} must have {channels} channels, got shape {tuple(x.shape)}")
    return x


def _one_hot_target(fn, name, target, y, ignore_index=255):
    """(one-hot float (B, C, H, W), valid (B, H, W) bool) from a label map or a one-hot tensor.

    A one-hot (or soft) target's values are checked to lie in [0, 1] in eager mode."""
    B, C, H, W = y.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a (B, H, W) label map or a (B, C, H, W) one-hot tensor, got {type(target).__name__}"
        )
    if target.dim() == 3:
        if target.shape != (B, H, W):
            raise ValueError(f"{fn}: {name} must have shape {(B, H, W)} as a label map, got {tuple(target.shape)}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} as a label map must hold integers, got {target.dtype}")
        _checks.check_same(fn, name, target, "the probabilities", y, what="device")
        target = target.long()
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= C))
        if not torch.compiler.is_compiling() and bool(bad.any()):
            raise ValueError(
                f"{fn}: {name} must hold labels in [0, {C}) or {ignore_index} (void), got {int(target[bad][0])}"
            )
        onehot = torch.nn.functional.one_hot(torch.where(valid, target, 0), C).permute(0, 3, 1, 2).to(y.dtype)
        return onehot * valid[:, None], valid
    if target.shape != y.shape:
        raise ValueError(
            f"{fn}: {name} must be a (B, H, W) label map or have the shape of the probabilities "
            f"{tuple(y.shape)}, got {tuple(target.shape)}"
        )
    if target.is_complex():
        raise TypeError(f"{fn}: {name} as a one-hot tensor must hold real values in [0, 1], got {target.dtype}")
    _checks.check_same(fn, name, target, "the probabilities", y, what="device")
    onehot = target.to(y.dtype)
    _checks.check_values(fn, **{name: (onehot, _checks.PROBABILITIES)})
    return onehot, torch.ones(B, H, W, dtype=torch.bool, device=y.device)


def _log(y, eps):
    return torch.log(y.clamp_min(eps))


def box_ce_loss(probs, box_masks, *, eps=1e-8, reduction="mean"):
    r"""L_box (Eq. 1): :math:`-\frac1m\sum_{c=0}^{L}\sum_i B(i,c)\log y(i,c)`, B from
    :func:`boxloss.boxes_to_masks` (one-hot or label map)."""
    return _ce("box_ce_loss", probs, "box_masks", box_masks, eps, reduction)


def pseudo_label_ce_loss(probs, pseudo_labels, *, eps=1e-8, ignore_index=255, reduction="mean"):
    r"""L_GC (Eq. 2): :math:`-\frac1m\sum_c\sum_i M(i,c)\log y(i,c)` on a pseudo ground truth M
    (GrabCut, DenseCRF, ...).  Void pixels (``ignore_index`` in a label map) are left out
    and m counts the others."""
    return _ce("pseudo_label_ce_loss", probs, "pseudo_labels", pseudo_labels, eps, reduction, ignore_index)


def _ce(fn, probs, target_name, target, eps, reduction, ignore_index=255):
    y = _probs(fn, "probs", probs)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    onehot, valid = _one_hot_target(fn, target_name, target, y, ignore_index)
    _checks.check_values(fn, probs=(y, _checks.PROBABILITIES))
    total = -(onehot * _log(y, eps)).sum((1, 2, 3))
    per_image = total / valid.sum((1, 2)).clamp_min(1).to(y.dtype)
    return _checks.reduce_per_image(per_image, reduction)


def attention_foreground_loss(probs, attention, box_masks, *, eps=1e-8, reduction="mean"):
    r"""L_fg (Eq. 3), normalised by box size per class:
    :math:`-\sum_{c=1}^{L} \frac{\sum_i \alpha(i,c) B(i,c) \log y(i,c)}{\sum_i B(i,c)}`
    (a class without box pixels contributes 0)."""
    return _attention_foreground("attention_foreground_loss", probs, attention, box_masks, eps, reduction)


def _attention_foreground(fn, probs, attention, box_masks, eps, reduction):
    y = _probs(fn, "probs", probs)
    a = _probs(fn, "attention", attention, y.shape[1] - 1)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    bx, _ = _one_hot_target(fn, "box_masks", box_masks, y)
    _checks.check_values(fn, probs=(y, _checks.PROBABILITIES), attention=(a, _checks.PROBABILITIES))
    fg = bx[:, 1:]
    num = -(a * fg * _log(y[:, 1:], eps)).sum((2, 3))
    per_image = (num / fg.sum((2, 3)).clamp_min(1)).sum(1)
    return _checks.reduce_per_image(per_image, reduction)


def attention_background_loss(probs, box_masks, *, eps=1e-8, reduction="mean"):
    r"""L_bg (Eq. 4): :math:`-\frac{\sum_i B(i,0)\log y(i,0)}{\sum_i B(i,0)}` over the pixels outside
    every box (0 for an image without any)."""
    return _attention_background("attention_background_loss", probs, box_masks, eps, reduction)


def _attention_background(fn, probs, box_masks, eps, reduction):
    y = _probs(fn, "probs", probs)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    bx, _ = _one_hot_target(fn, "box_masks", box_masks, y)
    _checks.check_values(fn, probs=(y, _checks.PROBABILITIES))
    bg = bx[:, 0]
    per_image = -(bg * _log(y[:, 0], eps)).sum((1, 2)) / bg.sum((1, 2)).clamp_min(1)
    return _checks.reduce_per_image(per_image, reduction)


def attention_weighted_loss(probs, attention, box_masks, *, eps=1e-8, reduction="mean"):
    """L_AW = L_fg + L_bg (Eq. 5)."""
    fn = "attention_weighted_loss"
    return _attention_foreground(fn, probs, attention, box_masks, eps, reduction) + _attention_background(
        fn, probs, box_masks, eps, reduction
    )


def attention_box_regulariser(attention, box_masks, *, reduction="mean"):
    r"""L^bbox_alpha (Eq. 6): :math:`\sum_i\sum_{c=1}^{L}(B(i,c)-\alpha(i,c))^2`, a sum over pixels
    and classes as in the paper (so it scales with the image size)."""
    fn = "attention_box_regulariser"
    a = _probs(fn, "attention", attention)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    shape = (a.shape[0], a.shape[1] + 1, a.shape[2], a.shape[3])
    bx, _ = _one_hot_target(fn, "box_masks", box_masks, a.new_empty(shape))
    _checks.check_values(fn, attention=(a, _checks.PROBABILITIES))
    per_image = ((bx[:, 1:] - a) ** 2).sum((1, 2, 3))
    return _checks.reduce_per_image(per_image, reduction)


def fill_rates(masks, box_masks, attention=None):
    r"""Per image and class (B, L): the pseudo-label fill rate
    :math:`\eta_c = \sum_i M(i,c) / \sum_i B(i,c)` (Eq. 7) and, with ``attention``, the
    predicted :math:`\eta'_c = \sum_i B(i,c)\alpha(i,c) / \sum_i B(i,c)` (Eq. 8).  Classes
    without box pixels get 0.  ``masks`` and ``box_masks`` are one-hot (B, L+1, H, W)
    or label maps.  Returns (eta, eta_prime or None, has_box (B, L) bool)."""
    return _fill_rates("fill_rates", "masks", masks, box_masks, attention)


def _fill_rates(fn, masks_name, masks, box_masks, attention):
    if attention is not None:
        a = _probs(fn, "attention", attention)
        shape = (a.shape[0], a.shape[1] + 1, a.shape[2], a.shape[3])
        ref = a.new_empty(shape)
    else:
        for name, t in ((masks_name, masks), ("box_masks", box_masks)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        ref_t = box_masks if box_masks.dim() == 4 else masks
        if ref_t.dim() != 4:
            raise ValueError(
                f"{fn}: without attention, {masks_name} or box_masks must be one-hot (B, L+1, H, W) to give L, "
                f"got shapes {tuple(masks.shape)} and {tuple(box_masks.shape)}"
            )
        ref = torch.empty(ref_t.shape, dtype=torch.float32, device=ref_t.device)
    bx, _ = _one_hot_target(fn, "box_masks", box_masks, ref)
    m, _ = _one_hot_target(fn, masks_name, masks, ref)
    if attention is not None:
        _checks.check_values(fn, attention=(a, _checks.PROBABILITIES))
    area = bx[:, 1:].sum((2, 3))
    eta = m[:, 1:].sum((2, 3)) / area.clamp_min(1)
    eta_prime = None if attention is None else (bx[:, 1:] * a).sum((2, 3)) / area.clamp_min(1)
    return eta, eta_prime, area > 0


def fill_rate_hinge_loss(attention, pseudo_labels, box_masks, *, gamma=0.7, reduction="mean"):
    r"""L^fr_alpha: :math:`\max(0, \gamma\eta_c - \eta'_c)` per class with boxes (Eq. 7-8), summed over
    the classes of each image; gamma 0.7 in the paper.  eta is a constant (no gradient)."""
    fn = "fill_rate_hinge_loss"
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"{fn}: gamma must be a number in [0, 1], got {gamma!r}")
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    if attention is None:
        raise TypeError(f"{fn}: attention must be a (B, L, H, W) tensor of attention maps, got None")
    eta, eta_prime, has_box = _fill_rates(fn, "pseudo_labels", pseudo_labels, box_masks, attention)
    hinge = torch.clamp(gamma * eta.detach() - eta_prime, min=0) * has_box
    return _checks.reduce_per_image(hinge.sum(1), reduction)


def affinity_loss(
    embeddings,
    probs,
    *,
    mode="exact",
    sample_fraction=0.1,
    valid_mask=None,
    labels=None,
    generator=None,
    reduction="mean",
):
    r"""Pixel-embedding affinity loss (Eq. 9-10), as a mean over pixel pairs:

    .. math::
        L_A = \frac{1}{m^2}\sum_{i,j}\big(\hat\beta_i\cdot\hat\beta_j - y_i\cdot y_j\big)^2,
        \qquad \hat\beta_i = \beta_i / \lVert\beta_i\rVert

    ``mode="exact"``: over ALL valid pixel pairs without an m x m matrix, through
    :math:`\sum_{ij}(b_i\cdot b_j - y_i\cdot y_j)^2 = \lVert B^\top B\rVert_F^2 - 2\lVert B^\top Y\rVert_F^2
    + \lVert Y^\top Y\rVert_F^2` (memory O((d + C)^2), time O(m (d + C)^2)).
    ``mode="sampled"``: the paper's class-balanced sampling, ``sample_fraction`` of the
    valid pixels drawn equally from each class (``labels``, default the arg-max of
    ``probs``), then the mean over all pairs of the sample.  The paper's sum is
    ``m^2`` times this mean.

    Shape:
        embeddings (B, d, H, W), probs (B, C, H, W), valid_mask (B, H, W) bool; per-image
        values reduced over images.
    """
    fn = "affinity_loss"
    _checks.check_tensor(fn, "embeddings", embeddings, dim=4, layout="(B, d, H, W)")
    y = _probs(fn, "probs", probs)
    _checks.check_float_dtype(fn, "embeddings", embeddings)
    if embeddings.shape[0] != y.shape[0] or embeddings.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"{fn}: embeddings must match probs in B, H and W ({tuple(y.shape)}), got {tuple(embeddings.shape)}"
        )
    _checks.check_choice(fn, "mode", mode, ("exact", "sampled"))
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    B, C, H, W = y.shape
    _checks.check_same(fn, "embeddings", embeddings, "probs", y, what="device")
    valid = torch.ones(B, H, W, dtype=torch.bool, device=y.device) if valid_mask is None else valid_mask
    if not isinstance(valid, torch.Tensor) or valid.shape != (B, H, W) or valid.dtype != torch.bool:
        raise ValueError(
            f"{fn}: valid_mask must be a bool tensor of shape {(B, H, W)}, got "
            f"{getattr(valid, 'dtype', None)} {tuple(getattr(valid, 'shape', ()))}"
        )
    _checks.check_same(fn, "valid_mask", valid, "probs", y, what="device")
    if labels is not None:
        _check_labels(fn, labels, B, C, H, W, y.device)
    _checks.check_values(fn, embeddings=(embeddings, _checks.FINITE), probs=(y, _checks.PROBABILITIES))
    b = torch.nn.functional.normalize(embeddings.to(y.dtype), dim=1, eps=1e-12).flatten(2)  # (B, d, m)
    yy = y.flatten(2)  # (B, C, m)
    v = valid.flatten(1).to(y.dtype)  # (B, m)
    if mode == "exact":
        bv, yv = b * v[:, None], yy * v[:, None]
        bb = torch.bmm(bv, bv.transpose(1, 2))
        by = torch.bmm(bv, yv.transpose(1, 2))
        yty = torch.bmm(yv, yv.transpose(1, 2))
        total = bb.square().sum((1, 2)) - 2 * by.square().sum((1, 2)) + yty.square().sum((1, 2))
        per_image = total / v.sum(1).square().clamp_min(1)
        return _checks.reduce_per_image(per_image, reduction)
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"{fn}: sample_fraction must lie in (0, 1], got {sample_fraction}")
    lab = (y.argmax(1) if labels is None else labels).flatten(1)
    per_image = []
    for i in range(B):  # sampling gives each image its own pixel count
        idx = _balanced_sample(lab[i], valid.flatten(1)[i], C, sample_fraction, generator)
        bs, ys = b[i][:, idx], yy[i][:, idx]
        diff = bs.t() @ bs - ys.t() @ ys
        per_image.append(diff.square().mean() if idx.numel() else y.sum() * 0)
    return _checks.reduce_per_image(torch.stack(per_image), reduction)


def _check_labels(fn, labels, B, C, H, W, device):
    """labels (B, H, W) integer classes in [0, C) for the class-balanced sampling."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a (B, H, W) integer tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must hold integer classes, got {labels.dtype}")
    if tuple(labels.shape) != (B, H, W):
        raise ValueError(f"{fn}: labels must have shape (B, H, W) = {(B, H, W)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{fn}: labels must be on the device of probs ({device}), got {labels.device}")
    if not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(labels.reshape(-1)))
        if low < 0 or high >= C:
            raise ValueError(
                f"{fn}: labels must hold classes in [0, {C}) for probs with {C} channels, got {low}..{high}"
            )


def _balanced_sample(labels, valid, num_classes, fraction, generator):
    n_valid = int(valid.sum())
    total = max(1, int(round(fraction * n_valid)))
    present = [c for c in range(num_classes) if bool(((labels == c) & valid).any())]
    if not present:
        return labels.new_zeros(0)
    per_class = max(1, total // len(present))
    picks = []
    for c in present:
        pool = torch.nonzero((labels == c) & valid).flatten()
        perm = torch.randperm(pool.numel(), generator=generator, device="cpu").to(pool.device)
        picks.append(pool[perm[:per_class]])
    return torch.cat(picks)


class _Settings(nn.Module):
    _fn = None
    _keys: tuple = ()

    def __init__(self, **settings) -> None:
        super().__init__()
        if "reduction" in settings:
            _checks.check_choice(type(self).__name__, "reduction", settings["reduction"], _checks.REDUCTIONS)
        self.settings = settings

    def forward(self, *args):
        return type(self)._fn(*args, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())


class BoxCELoss(_Settings):
    """Module form of :func:`box_ce_loss`: forward(probs, box_masks)."""

    _fn = staticmethod(box_ce_loss)

    def __init__(self, *, eps=1e-8, reduction="mean"):
        super().__init__(eps=eps, reduction=reduction)


class PseudoLabelCELoss(_Settings):
    """Module form of :func:`pseudo_label_ce_loss`: forward(probs, pseudo_labels)."""

    _fn = staticmethod(pseudo_label_ce_loss)

    def __init__(self, *, eps=1e-8, ignore_index=255, reduction="mean"):
        super().__init__(eps=eps, ignore_index=ignore_index, reduction=reduction)


class AttentionWeightedLoss(_Settings):
    """Module form of :func:`attention_weighted_loss`: forward(probs, attention, box_masks)."""

    _fn = staticmethod(attention_weighted_loss)

    def __init__(self, *, eps=1e-8, reduction="mean"):
        super().__init__(eps=eps, reduction=reduction)


class FillRateHingeLoss(_Settings):
    """Module form of :func:`fill_rate_hinge_loss`: forward(attention, pseudo_labels, box_masks)."""

    _fn = staticmethod(fill_rate_hinge_loss)

    def __init__(self, *, gamma=0.7, reduction="mean"):
        super().__init__(gamma=gamma, reduction=reduction)


class AttentionBoxRegulariser(_Settings):
    """Module form of :func:`attention_box_regulariser`: forward(attention, box_masks)."""

    _fn = staticmethod(attention_box_regulariser)

    def __init__(self, *, reduction="mean"):
        super().__init__(reduction=reduction)


class AffinityLoss(_Settings):
    """Module form of :func:`affinity_loss`: forward(embeddings, probs)."""

    _fn = staticmethod(affinity_loss)

    def __init__(self, *, mode="exact", sample_fraction=0.1, reduction="mean"):
        _checks.check_choice("AffinityLoss", "mode", mode, ("exact", "sampled"))
        super().__init__(mode=mode, sample_fraction=sample_fraction, reduction=reduction)
