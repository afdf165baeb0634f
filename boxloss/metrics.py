"""Segmentation metrics, batched in torch and usable during training.

- :func:`confusion_matrix` and :func:`mean_iou`: mIoU with an ignore index and the per-class table;
- :func:`fbeta_score`: F-beta with beta^2 = 0.3 (Box to Tag and Back, Table 1) for binary masks;
- :func:`fill_rate_statistics`: per-class filling rates (object pixels / box area) of a labelled set.
"""

from __future__ import annotations

import torch

from boxloss import _checks
from boxloss.ops.box_masks import _priority, box_front_index


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """(C, C) int64, rows = true class, columns = predicted class; pixels whose target is
    ``ignore_index`` are left out.  pred and target: integer tensors of one shape.
    Targets or predictions outside [0, C) (other than ignore_index) raise ValueError."""
    fn = "confusion_matrix"
    num_classes = _checks.check_int(fn, "num_classes", num_classes, minimum=1)
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: pred and target must be tensors")
    if pred.shape != target.shape:
        raise ValueError(
            f"{fn}: pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise TypeError(f"{fn}: pred and target must be integer label maps, got {pred.dtype} and {target.dtype}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    for name, x in (("target", t), ("pred", p)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(
                f"{fn}: {name} must hold labels in [0, {num_classes}) (or {ignore_index} in target), "
                f"got values in [{int(x.min())}, {int(x.max())}]"
            )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def check_confusion_matrix(fn: str, cm) -> torch.Tensor:
    """A confusion matrix is a square (C, C) tensor of non-negative integer counts (any integer dtype but bool),
    as :func:`confusion_matrix` returns and sums of such matrices are.  That is all that can be checked: a square
    integer label map with no negative value is also a valid table of counts, and is read as one."""
    if not isinstance(cm, torch.Tensor):
        raise TypeError(f"{fn}: cm must be a (C, C) confusion matrix tensor, got {type(cm).__name__}")
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(
            f"{fn}: cm must be a square (C, C) confusion matrix with C >= 1 (rows true classes, columns "
            f"predictions, as confusion_matrix returns), got shape {tuple(cm.shape)}"
        )
    if cm.dtype.is_floating_point or cm.dtype.is_complex or cm.dtype == torch.bool:
        raise TypeError(
            f"{fn}: cm must hold integer pixel counts (as confusion_matrix returns), got {cm.dtype}; "
            "round a float matrix of counts with cm.round().long()"
        )
    negative = cm < 0
    if bool(negative.any()):
        i, j = negative.nonzero()[0].tolist()
        raise ValueError(f"{fn}: cm must hold counts >= 0, got cm[{i}, {j}] = {int(cm[i, j])}")
    return cm


def mean_iou(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mIoU, per-class IoU) from a confusion matrix (C, C) of integer counts, rows true classes and columns
    predictions (:func:`confusion_matrix`).  A class absent from both the targets and the predictions has IoU
    NaN and is left out of the mean.  Anything but a square, non-negative integer matrix raises."""
    cm = check_confusion_matrix("mean_iou", cm).to(torch.float64)
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = iou[present].mean() if bool(present.any()) else torch.tensor(float("nan"), dtype=torch.float64)
    return miou, iou


def iou_table(cm: torch.Tensor, class_names=None) -> str:
    """The per-class IoU table as text (percent), with the mean."""
    check_confusion_matrix("iou_table", cm)
    miou, iou = mean_iou(cm)
    names = class_names or [str(c) for c in range(cm.shape[0])]
    lines = [f"{'class':>16} | IoU (%)", "-" * 28]
    for name, v in zip(names, iou.tolist()):
        lines.append(f"{name:>16} | {'n/a' if v != v else f'{100 * v:6.2f}'}")
    lines.append(f"{'mean':>16} | {100 * float(miou):6.2f}")
    return "\n".join(lines)


def fbeta_score(pred: torch.Tensor, target: torch.Tensor, *, beta2: float = 0.3, valid_mask=None) -> torch.Tensor:
    r"""F-beta of binary masks, per item over the leading dimension:

    .. math::
        F_\beta = \frac{(1+\beta^2)\,P\,R}{\beta^2 P + R}

    with precision P and recall R of ``pred`` against ``target`` (bool, (N, ...));
    0 where P + R = 0 (no true positive).  beta^2 = 0.3 weights precision more, as in
    Box to Tag and Back's Table 1."""
    fn = "fbeta_score"
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a bool tensor of shape (N, ...), got {type(t).__name__}")
    if pred.shape != target.shape or pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ValueError(
            f"{fn}: pred and target must be bool tensors of one shape, got {pred.dtype} "
            f"{tuple(pred.shape)} and {target.dtype} {tuple(target.shape)}"
        )
    if pred.dim() < 1:
        raise ValueError(f"{fn}: pred and target must have a leading item dimension (N, ...), got a 0-d tensor")
    if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not (0 < beta2 < float("inf")):
        raise ValueError(f"{fn}: beta2 must be a positive finite number, got {beta2!r}")
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            got = valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask).__name__
            raise TypeError(f"{fn}: valid_mask must be a bool tensor of pred's shape {tuple(pred.shape)}, got {got}")
        if valid_mask.shape != pred.shape:
            raise ValueError(
                f"{fn}: valid_mask must have pred's shape {tuple(pred.shape)}, got {tuple(valid_mask.shape)}"
            )
        _checks.check_same(fn, "valid_mask", valid_mask, "pred", pred, what="device")
        pred, target = pred & valid_mask, target & valid_mask
    dims = tuple(range(1, pred.dim()))
    tp = (pred & target).sum(dims).double()
    precision = tp / pred.sum(dims).double().clamp_min(1)
    recall = tp / target.sum(dims).double().clamp_min(1)
    denom = beta2 * precision + recall
    return torch.where(denom > 0, (1 + beta2) * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))


def fill_rate_statistics(
    label_maps: torch.Tensor,
    boxes,
    box_batch,
    box_labels,
    num_classes: int,
    *,
    spatial_scale: float = 1.0,
    ignore_index: int = 255,
) -> dict:
    """Filling rate of every box: pixels of its class inside the box / box pixels (the
    box convention's covered pixels), from (B, H, W) label maps.  Returns
    ``{"per_box": (K,), "mean": (L+1,), "std": (L+1,), "count": (L+1,)}`` by class
    (NaN where a class has no box).  Box sums use integral images: no (K, H, W) tensor."""
    B, H, W = label_maps.shape
    C = num_classes + 1
    _, ranges = box_front_index(
        boxes,
        box_batch,
        box_labels,
        _priority(boxes, "smaller-front", float(spatial_scale), (H, W)),
        B,
        C,
        H,
        W,
        float(spatial_scale),
        fn="fill_rate_statistics",
    )
    onehot = torch.nn.functional.one_hot(torch.where(label_maps == ignore_index, 0, label_maps).long(), C)
    integral = torch.zeros(B, C, H + 1, W + 1, dtype=torch.long, device=label_maps.device)
    integral[:, :, 1:, 1:] = onehot.permute(0, 3, 1, 2).cumsum(2).cumsum(3)
    flat = integral.view(B * C, H + 1, W + 1)
    idx = box_batch * C + box_labels
    r0, r1, c0, c1 = ranges.unbind(1)
    inside = flat[idx, r1, c1] - flat[idx, r0, c1] - flat[idx, r1, c0] + flat[idx, r0, c0]
    area = (r1 - r0) * (c1 - c0)
    per_box = torch.where(
        area > 0,
        inside.double() / area.clamp_min(1).double(),
        torch.full_like(inside, float("nan"), dtype=torch.float64),
    )
    ok = area > 0
    count = torch.zeros(C, dtype=torch.long, device=boxes.device).index_add_(
        0, box_labels[ok], torch.ones_like(box_labels[ok])
    )
    s = torch.zeros(C, dtype=torch.float64, device=boxes.device).index_add_(0, box_labels[ok], per_box[ok])
    s2 = torch.zeros(C, dtype=torch.float64, device=boxes.device).index_add_(0, box_labels[ok], per_box[ok] ** 2)
    n = count.double()
    mean = torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))
    var = torch.where(
        n > 0, (s2 / n.clamp_min(1) - mean.nan_to_num() ** 2).clamp_min(0), torch.full_like(s, float("nan"))
    )
    return {"per_box": per_box, "mean": mean, "std": var.sqrt(), "count": count}
