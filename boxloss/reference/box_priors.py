"""Reference box priors: readable loops over boxes, rows and images.

The oracle of the fused kernels and the baseline of benchmarks/box_priors.py.
Each maximum is taken with ``argmax`` (the first maximum, i.e. the lowest
index) and ``gather``, so autograd sends its gradient to that one pixel, as the
kernels do.
"""

from __future__ import annotations

import torch

from boxloss.reference.boxes import box_pixel_ranges, check_box

_FN = "box_row_col_max"


def _first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max along dim, differentiable into the first arg-max only."""
    return x.gather(dim, x.argmax(dim, keepdim=True)).squeeze(dim)


def box_row_col_max_reference(probs, boxes, box_batch, box_labels, spatial_scale=1.0):
    """Dense form of the primitive: (row_max (K, H), col_max (K, W), ranges (K, 4)).

    row_max[k, r] is the maximum of probs[box_batch[k], box_labels[k], r, cols_k]
    for each covered row r (0 elsewhere); col_max likewise; ranges holds
    row_begin, row_end, col_begin, col_end.
    """
    B, C, H, W = probs.shape
    rows_out, cols_out, ranges = [], [], []
    for k, (box, b, label) in enumerate(zip(boxes.tolist(), box_batch.tolist(), box_labels.tolist())):
        check_box(_FN, k, box, b, label, B, C)
        rows, cols = box_pixel_ranges(box, spatial_scale, H, W)
        row_max = probs.new_zeros(H)
        col_max = probs.new_zeros(W)
        if len(rows) > 0:
            region = probs[b, label, rows.start : rows.stop, cols.start : cols.stop]
            if torch.isnan(region).any():
                raise ValueError(f"{_FN}: probs must not hold NaN inside a box, but the pixels of boxes[{k}] do")
            row_max = torch.cat([probs.new_zeros(rows.start), _first_max(region, 1), probs.new_zeros(H - rows.stop)])
            col_max = torch.cat([probs.new_zeros(cols.start), _first_max(region, 0), probs.new_zeros(W - cols.stop)])
            ranges.append([rows.start, rows.stop, cols.start, cols.stop])
        else:
            ranges.append([0, 0, 0, 0])
        rows_out.append(row_max)
        cols_out.append(col_max)
    K = boxes.shape[0]
    row_max = torch.stack(rows_out) if K else probs.new_zeros(0, H)
    col_max = torch.stack(cols_out) if K else probs.new_zeros(0, W)
    return row_max, col_max, torch.tensor(ranges, dtype=torch.long, device=probs.device).reshape(K, 4)


def _reduce_boxes(per_box, nonempty, reduction):
    if reduction == "none":
        return per_box
    if reduction == "sum":
        return per_box.sum()
    return per_box.sum() / max(int(nonempty.sum()), 1)


def tight_box_loss_reference(
    probs, boxes, box_batch, box_labels, *, spatial_scale=1.0, mode="either", reduction="mean"
):
    """Eq. 6, second term, per box: (max{mean row max, mean col max} - 1)^2 ("either"),
    or the mean of (mean row max - 1)^2 and (mean col max - 1)^2 ("both")."""
    B, C, H, W = probs.shape
    losses, nonempty = [], []
    for k, (box, b, label) in enumerate(zip(boxes.tolist(), box_batch.tolist(), box_labels.tolist())):
        check_box("tight_box_loss", k, box, b, label, B, C)
        rows, cols = box_pixel_ranges(box, spatial_scale, H, W)
        if len(rows) == 0:
            losses.append(probs.new_zeros(()))
            nonempty.append(False)
            continue
        region = probs[b, label, rows.start : rows.stop, cols.start : cols.stop]
        mean_row_max = _first_max(region, 1).mean()
        mean_col_max = _first_max(region, 0).mean()
        if mode == "either":
            loss = (torch.maximum(mean_row_max, mean_col_max) - 1) ** 2
        else:
            loss = 0.5 * ((mean_row_max - 1) ** 2 + (mean_col_max - 1) ** 2)
        losses.append(loss)
        nonempty.append(True)
    per_box = torch.stack(losses) if losses else probs.new_zeros(0)
    return _reduce_boxes(per_box, torch.tensor(nonempty, dtype=torch.bool), reduction)


def _covered_by_class(fn, probs, boxes, box_batch, box_labels, spatial_scale):
    """Checks every box; returns {(b, c): [(rows, cols) of its non-empty boxes]}."""
    B, C, H, W = probs.shape
    out = {}
    for k, (box, b, c) in enumerate(zip(boxes.tolist(), box_batch.tolist(), box_labels.tolist())):
        check_box(fn, k, box, b, c, B, C)
        rows, cols = box_pixel_ranges(box, spatial_scale, H, W)
        if len(rows) > 0:
            out.setdefault((b, c), []).append((rows, cols))
    return out


def mil_box_loss_reference(
    probs,
    boxes,
    box_batch,
    box_labels,
    *,
    spatial_scale=1.0,
    background_channel=0,
    negatives="all",
    eps=1e-6,
    reduction="mean",
):
    """Hsu et al. (NeurIPS 2019) in the semantic setting.  Per image b, bags are
    rows and columns: each covered row / column of each box of class c is a
    positive bag (its maximum inside the box), each image row / column that no
    box of class c covers is a negative bag of class c (its maximum over the
    whole image row / column), for every channel c except the background
    (``negatives="present"``: only classes with a box in the image).  The image
    loss is the mean binary cross-entropy over all its bags."""
    B, C, H, W = probs.shape
    by_class = _covered_by_class("mil_box_loss", probs, boxes, box_batch, box_labels, spatial_scale)
    per_image = []
    for b in range(B):
        terms = []
        for c in range(C):
            own = by_class.get((b, c), [])
            for rows, cols in own:
                region = probs[b, c, rows.start : rows.stop, cols.start : cols.stop]
                for bag_max in (_first_max(region, 1), _first_max(region, 0)):
                    terms.append(-torch.log(bag_max.clamp_min(eps)))
            if c == background_channel or (negatives == "present" and not own):
                continue
            covered_rows = set(r for rows, _ in own for r in rows)
            covered_cols = set(j for _, cols in own for j in cols)
            plane = probs[b, c]
            row_max = _first_max(plane, 1)
            col_max = _first_max(plane, 0)
            free_rows = [r for r in range(H) if r not in covered_rows]
            free_cols = [j for j in range(W) if j not in covered_cols]
            if free_rows:
                terms.append(-torch.log((1 - row_max[free_rows]).clamp_min(eps)))
            if free_cols:
                terms.append(-torch.log((1 - col_max[free_cols]).clamp_min(eps)))
        per_image.append(torch.cat(terms).mean() if terms else probs.new_zeros(()))
    per_image = torch.stack(per_image)
    return _reduce_images(per_image, reduction)


def projection_loss_reference(probs, boxes, box_batch, box_labels, *, spatial_scale=1.0, eps=1e-5, reduction="mean"):
    """BoxInst (Tian et al., CVPR 2021) in the semantic setting: for each image b
    and each class c with a box there, dice(max_x P, max_x M) + dice(max_y P, max_y M)
    with P = probs[b, c] and M the union of the class's box masks,
    dice(p, t) = 1 - 2 sum(p t) / (sum p^2 + sum t^2 + eps); the image loss is
    the mean over its classes with a box (0 without any)."""
    B, C, H, W = probs.shape
    by_class = _covered_by_class("projection_loss", probs, boxes, box_batch, box_labels, spatial_scale)
    per_image = []
    for b in range(B):
        terms = []
        for c in range(C):
            own = by_class.get((b, c), [])
            if not own:
                continue
            mask = probs.new_zeros(H, W)
            for rows, cols in own:
                mask[rows.start : rows.stop, cols.start : cols.stop] = 1
            plane = probs[b, c]
            loss = 0
            for dim in (0, 1):
                p = _first_max(plane, dim)
                t = mask.amax(dim)
                loss = loss + 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + eps)
            terms.append(loss)
        per_image.append(torch.stack(terms).mean() if terms else probs.new_zeros(()))
    return _reduce_images(torch.stack(per_image), reduction)


def _reduce_images(per_image, reduction):
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()
