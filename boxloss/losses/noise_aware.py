r"""BANA's noise-aware loss (Sec. 3.3) with its cosine classifier.

Oh, Kim and Ham, "Background-Aware Pooling and Noise-Aware Loss for
Weakly-Supervised Semantic Segmentation", CVPR 2021, with its supplement.  The
two pseudo labels it compares, Y_crf and Y_ret, come from
:func:`boxloss.bana_pseudo_labels` (:mod:`boxloss.recipes.bana`).

Noise-aware loss (:func:`noise_aware_loss`) with the cosine classifier of the
supplement (Eq. 3) ``H_c(p) = softmax_c(tau cos(phi(p), W_c))``:

.. math::
    \mathcal{L}_{ce} = -\frac{1}{|S|} \sum_{p \in S} \log H_{c^*}(p), \quad
    \sigma(p) = \Big(\frac{1 + \cos(\phi(p), W_{c^*})}{\max_c (1 + \cos(\phi(p), W_c))}\Big)^\gamma  \quad (10\text{-}12)

    \mathcal{L}_{wce} = -\frac{\sum_{p \notin S} \sigma(p) \log H_{c^*}(p)}{\sum_{p \notin S} \sigma(p)}, \quad
    \mathcal{L} = \mathcal{L}_{ce} + \lambda \mathcal{L}_{wce}                             \quad (13, 14)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from boxloss import _checks

UNRELIABLE = ("nal", "ignore", "entropy", "bootstrap")
COS_EPS = 1e-8


def cosine_logits(features: torch.Tensor, classifier_weight: torch.Tensor, tau: float = 20.0) -> torch.Tensor:
    """(B, C, H, W) logits tau * cos(phi(p), W_c) of the cosine classifier (supplement Eq. 3).

    Norms are clamped at 1e-8, so a zero feature vector has cosine 0 with every class.
    ``features`` (B, D, H, W) and ``classifier_weight`` (C, D) share a dtype and a
    device and must be finite (NaN or Inf raise ValueError in eager mode).
    """
    fn = "cosine_logits"
    _check_classifier(fn, features, classifier_weight)
    _checks.check_positive(fn, "tau", tau)
    _checks.check_values(fn, features=(features, _checks.FINITE), classifier_weight=(classifier_weight, _checks.FINITE))
    return _cosine_logits(features, classifier_weight, tau)


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / max(|x|, 1e-8) along dim.  Divided by its largest magnitude first, so that the
    squares of huge (finite) values do not overflow the norm to Inf (which would make
    the vector 0); the clamp still sends a zero vector to 0."""
    scale = x.detach().abs().amax(dim, keepdim=True).clamp_min(1)
    y = x / scale  # the same direction; |y| >= 1 wherever scale > 1, so the clamp only acts where scale = 1
    return y / y.norm(dim=dim, keepdim=True).clamp_min(COS_EPS / scale)


def _cosine_logits(features, classifier_weight, tau):
    phi = _unit(features, 1)
    w = _unit(classifier_weight, 1)
    return tau * torch.einsum("bdhw,cd->bchw", phi, w)


def _check_classifier(fn, features, classifier_weight):
    _checks.check_tensor(fn, "features", features, dim=4, layout="(B, D, H, W)")
    _checks.check_float_dtype(fn, "features", features)
    _checks.check_tensor(fn, "classifier_weight", classifier_weight, dim=2, layout="(C, D)")
    if classifier_weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"{fn}: classifier_weight must have shape (C, D) with D = {features.shape[1]}, "
            f"got {tuple(classifier_weight.shape)}"
        )
    _checks.check_same(fn, "classifier_weight", classifier_weight, "features", features, what="dtype")
    _checks.check_same(fn, "classifier_weight", classifier_weight, "features", features, what="device")


def bootstrap_beta(iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The poly schedule of the bootstrapping beta, from 1 at iteration 0 to 0 at max_iterations (supplement Eq. 7)."""
    fn = "bootstrap_beta"
    _checks.check_int(fn, "max_iterations", max_iterations, minimum=1)
    _checks.check_int(fn, "iteration", iteration, minimum=0)
    return float(max(0.0, 1.0 - iteration / max_iterations) ** power)


def noise_aware_loss(
    features: torch.Tensor,
    classifier_weight: torch.Tensor,
    y_crf: torch.Tensor,
    y_ret: torch.Tensor,
    *,
    gamma: float = 7.0,
    lam: float = 0.1,
    tau: float = 20.0,
    ignore_index: int = 255,
    detach_confidence: bool = True,
    unreliable: str = "nal",
    beta: float = 1.0,
    return_terms: bool = False,
):
    r"""The noise-aware loss L = L_ce + lam * L_wce (BANA Eq. 10-14).

    S, the reliable region, holds the pixels where ``y_crf == y_ret``; the
    unreliable region ~S the pixels where they differ; pixels with ``y_crf ==
    ignore_index`` are in neither (a ``y_ret`` of ignore_index with a valid
    ``y_crf`` counts as disagreement).  The target everywhere is c* = y_crf.

    ``unreliable`` selects the term on ~S (Table 3 of the paper): ``"nal"``
    (Eq. 13, confidence-weighted CE), ``"ignore"`` (0), ``"entropy"`` (supplement
    Eq. 4, mean entropy of H over ~S) or ``"bootstrap"`` (supplement Eq. 6-7,
    cross-entropy to ``beta * onehot(y_crf) + (1 - beta) * H``, H detached; see
    :func:`bootstrap_beta` for the poly schedule).

    Means over empty sets are 0, so the loss is finite when S or ~S is empty
    (and for zero feature vectors, whose cosines are 0).  The confidence is
    detached by default (a weight, not a target of the gradient; set
    ``detach_confidence=False`` to differentiate through Eq. 11-12).

    Args:
        features: (B, D, H, W) phi (at the label resolution), finite.
        classifier_weight: (C, D) W, C = L + 1 classes (no bias), finite, the
            dtype and device of ``features``.
        y_crf, y_ret: (B, H, W) int64 labels in [0, C) or ignore_index.  Values
            (NaN or Inf features or weights, labels out of range) are checked
            in eager mode, not inside ``torch.compile`` (a compiled graph
            cannot branch on values).
        gamma: damping of Eq. 12 (>= 1 in the paper, 7 by default).
        lam: lambda of Eq. 14.
        tau: scale of the cosine classifier.
        return_terms: also return the parts of the loss.

    Returns:
        The scalar loss ``L_ce + lam * L_unreliable``; with ``return_terms=True``
        the pair ``(loss, terms)``, ``terms`` a dict holding ``"ce"`` (L_ce on S),
        ``"unreliable"`` (the term on ~S: L_wce, the entropy, the bootstrapped
        cross-entropy, or 0) and ``"confidence"`` (the (B, H, W) map sigma of
        Eq. 12, 0 where ``y_crf`` is ignore_index; a weight, not a loss term).

    Shape:
        features (B, D, H, W), labels (B, H, W) -> scalar loss.

    Example:
        >>> phi = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> W = torch.randn(3, 16, requires_grad=True)
        >>> y1 = torch.randint(0, 3, (2, 8, 8)); y2 = torch.randint(0, 3, (2, 8, 8))
        >>> loss = noise_aware_loss(phi, W, y1, y2)
        >>> loss.backward()
        >>> loss, terms = noise_aware_loss(phi, W, y1, y2, return_terms=True)
        >>> sorted(terms)
        ['ce', 'confidence', 'unreliable']
    """
    fn = "noise_aware_loss"
    _check_classifier(fn, features, classifier_weight)
    B, D, H, W = features.shape
    C = classifier_weight.shape[0]
    for name, y in (("y_crf", y_crf), ("y_ret", y_ret)):
        _checks.check_tensor(fn, name, y, dim=3, layout="(B, H, W)")
        if y.dtype != torch.long:
            raise TypeError(f"{fn}: {name} must be an int64 tensor, got {y.dtype}")
        if tuple(y.shape) != (B, H, W):
            raise ValueError(f"{fn}: {name} must have shape (B, H, W) = {(B, H, W)}, got {tuple(y.shape)}")
        _checks.check_same(fn, name, y, "features", features, what="device")
    _checks.check_choice(fn, "unreliable", unreliable, UNRELIABLE)
    for name, v in (("gamma", gamma), ("tau", tau)):
        _checks.check_positive(fn, name, v)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{fn}: lam must be a number >= 0, got {lam!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{fn}: beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(return_terms, bool):
        raise TypeError(f"{fn}: return_terms must be a bool, got {type(return_terms).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not torch.compiler.is_compiling():
        _checks.check_values(
            fn, features=(features, _checks.FINITE), classifier_weight=(classifier_weight, _checks.FINITE)
        )
        # A label out of range would index garbage (y_crf) or silently count as
        # disagreement (y_ret): both are checked, on the values.
        for name, y in (("y_crf", y_crf), ("y_ret", y_ret)):
            bad = (y != ignore_index) & ((y < 0) | (y >= C))
            if bool(bad.any()):
                raise ValueError(
                    f"{fn}: {name} must hold labels in [0, {C}) or ignore_index = {ignore_index}, got {int(y[bad][0])}"
                )

    logits = _cosine_logits(features, classifier_weight, tau)
    log_h = logits.log_softmax(1)
    labelled = y_crf != ignore_index
    target = torch.where(labelled, y_crf, torch.zeros_like(y_crf))
    nll = -log_h.gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)
    reliable = labelled & (y_ret == y_crf)
    unreliable_mask = labelled & ~reliable
    zero = nll.new_zeros(())
    ce = torch.where(reliable, nll, zero).sum() / reliable.sum().clamp_min(1)

    # Eq. 11-12 on the same cosines (logits / tau); 1 + cos >= 0.
    corr = 1.0 + logits / tau
    corr_star = corr.gather(1, target.unsqueeze(1)).squeeze(1)
    ratio = corr_star / corr.amax(1).clamp_min(COS_EPS)
    confidence = torch.where(labelled, ratio.clamp(0.0, 1.0) ** gamma, zero)
    if detach_confidence:
        confidence = confidence.detach()

    count = unreliable_mask.sum().clamp_min(1)
    if unreliable == "nal":
        weights = torch.where(unreliable_mask, confidence, zero)
        total = weights.sum()
        term = (weights * nll).sum() / torch.where(total > 0, total, torch.ones_like(total))
    elif unreliable == "entropy":
        entropy = -(log_h.exp() * log_h).sum(1)
        term = torch.where(unreliable_mask, entropy, zero).sum() / count
    elif unreliable == "bootstrap":
        probs = log_h.exp().detach()
        onehot = F.one_hot(target, C).permute(0, 3, 1, 2).to(log_h.dtype)
        soft = beta * onehot + (1.0 - beta) * probs
        per_pixel = -(soft * log_h).sum(1)
        term = torch.where(unreliable_mask, per_pixel, zero).sum() / count
    else:
        term = zero
    loss = ce + lam * term
    if return_terms:
        return loss, {"ce": ce, "unreliable": term, "confidence": confidence}
    return loss


class NoiseAwareLoss(nn.Module):
    """Module form of :func:`noise_aware_loss`: stores the settings, checks them once, and delegates.

    ``forward(features, classifier_weight, y_crf, y_ret, beta=1.0, *, return_terms=False)`` returns
    the scalar loss, or ``(loss, terms)`` as :func:`noise_aware_loss`.  ``NoiseAwareCELoss`` is
    another name for this class.

    Example:
        >>> nal = NoiseAwareLoss(gamma=7.0, lam=0.1)
        >>> loss = nal(phi, classifier.weight, y_crf, y_ret)
    """

    def __init__(
        self,
        *,
        gamma: float = 7.0,
        lam: float = 0.1,
        tau: float = 20.0,
        ignore_index: int = 255,
        detach_confidence: bool = True,
        unreliable: str = "nal",
    ) -> None:
        super().__init__()
        _checks.check_choice(type(self).__name__, "unreliable", unreliable, UNRELIABLE)
        self.gamma, self.lam, self.tau = gamma, lam, tau
        self.ignore_index, self.detach_confidence, self.unreliable = ignore_index, detach_confidence, unreliable

    def forward(self, features, classifier_weight, y_crf, y_ret, beta: float = 1.0, *, return_terms: bool = False):
        return noise_aware_loss(
            features,
            classifier_weight,
            y_crf,
            y_ret,
            gamma=self.gamma,
            lam=self.lam,
            tau=self.tau,
            ignore_index=self.ignore_index,
            detach_confidence=self.detach_confidence,
            unreliable=self.unreliable,
            beta=beta,
            return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, lam={self.lam}, tau={self.tau}, unreliable={self.unreliable!r}"


NoiseAwareCELoss = NoiseAwareLoss
