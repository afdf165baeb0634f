"""The (L+1)-way classification loss of background-aware pooling (BANA, Sec. 3.1).

Oh, Kim and Ham, "Background-Aware Pooling and Noise-Aware Loss for
Weakly-Supervised Semantic Segmentation", CVPR 2021.  Its inputs come from
:func:`boxloss.background_attention` and :func:`boxloss.background_aware_pool`
(or :class:`boxloss.BackgroundAwarePooling`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from boxloss import _checks


def bap_classification_loss(
    pooled: torch.Tensor,
    box_labels: torch.Tensor,
    queries: torch.Tensor,
    valid: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""(L+1)-way cross-entropy of BAP training (BANA Sec. 3.1, "Loss").

    Every bin of every pooled box feature r_i is a sample labelled with its box's
    label (1..L), every valid query q_j a sample labelled 0 (background); the
    loss is the mean cross-entropy of ``classifier_weight @ x (+ bias)`` over all
    samples (0 when there are none).

    Args:
        pooled: (K, D, S, S) from :func:`background_aware_pool`.
        box_labels: (K,) int64 in [1, L].
        queries, valid: from :func:`background_attention`.
        classifier_weight: (L+1, D); classifier_bias: optional (L+1,).

    The float tensors share a dtype and a device and must be finite (NaN or
    Inf raise ValueError in eager mode; inside ``torch.compile`` the value
    check is skipped, as a compiled graph cannot branch on values).

    Example:
        >>> w = torch.randn(21, 8, requires_grad=True)
        >>> bap_classification_loss(torch.randn(3, 8, 1, 1), torch.tensor([1, 5, 20]),
        ...                         torch.randn(2, 16, 8), torch.ones(2, 16, dtype=torch.bool), w).backward()
    """
    fn = "bap_classification_loss"
    _checks.check_tensor(fn, "pooled", pooled, dim=4, layout="(K, D, S, S)")
    _checks.check_tensor(fn, "queries", queries, dim=3, layout="(B, J, D)")
    _checks.check_tensor(fn, "classifier_weight", classifier_weight, dim=2, layout="(L+1, D)")
    K, D = pooled.shape[:2]
    if box_labels.shape != (K,):
        raise ValueError(f"{fn}: box_labels must have shape (K,) = ({K},), got {tuple(box_labels.shape)}")
    if queries.shape[2] != D or classifier_weight.shape[1] != D:
        raise ValueError(
            f"{fn}: pooled, queries and classifier_weight must share D = {D}, got "
            f"{queries.shape[2]} and {classifier_weight.shape[1]}"
        )
    if valid.shape != queries.shape[:2]:
        raise ValueError(f"{fn}: valid must have shape {tuple(queries.shape[:2])}, got {tuple(valid.shape)}")
    for name, t in (("queries", queries), ("classifier_weight", classifier_weight)):
        _checks.check_same(fn, name, t, "pooled", pooled, what="dtype")
        _checks.check_same(fn, name, t, "pooled", pooled, what="device")
    finite = {"pooled": pooled, "queries": queries, "classifier_weight": classifier_weight}
    if classifier_bias is not None:
        finite["classifier_bias"] = classifier_bias
    _checks.check_values(fn, **{name: (t, _checks.FINITE) for name, t in finite.items()})
    box_samples = pooled.permute(0, 2, 3, 1).reshape(-1, D)
    box_targets = box_labels.repeat_interleave(pooled.shape[2] * pooled.shape[3])
    samples = torch.cat([box_samples, queries.reshape(-1, D)])
    targets = torch.cat(
        [box_targets, torch.zeros(queries.shape[0] * queries.shape[1], dtype=torch.long, device=queries.device)]
    )
    weights = torch.cat([torch.ones_like(box_targets, dtype=samples.dtype), valid.reshape(-1).to(samples.dtype)])
    logits = F.linear(samples, classifier_weight, classifier_bias)
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp_min(1)
