"""What the metrics accept: a confusion matrix is a square (C, C) tensor of non-negative integer counts; F-beta
takes bool masks of one shape and a bool valid mask of that shape.  Anything else raises with a message that names
the function and the argument."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from boxloss.metrics import confusion_matrix, fbeta_score, iou_table, mean_iou


def _cm():
    return confusion_matrix(torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 1]), 3)


@pytest.mark.parametrize("fn", [mean_iou, iou_table])
@pytest.mark.parametrize(
    "cm, exc, match",
    [
        (torch.arange(20).view(4, 5), ValueError, r"square \(C, C\) confusion matrix.*got shape \(4, 5\)"),
        (torch.arange(6), ValueError, r"square \(C, C\).*got shape \(6,\)"),
        (torch.zeros(2, 3, 3, dtype=torch.long), ValueError, r"square \(C, C\).*got shape \(2, 3, 3\)"),
        (torch.zeros(0, 0, dtype=torch.long), ValueError, r"C >= 1.*got shape \(0, 0\)"),
        (torch.rand(6, 6), TypeError, "integer pixel counts.*got torch.float32"),
        (torch.eye(3, dtype=torch.float64) * 4, TypeError, "integer pixel counts.*got torch.float64"),
        (torch.eye(3, dtype=torch.bool), TypeError, "integer pixel counts.*got torch.bool"),
        (torch.tensor([[3, -1], [0, 2]]), ValueError, r"counts >= 0, got cm\[0, 1\] = -1"),
        ([[1, 0], [0, 1]], TypeError, r"\(C, C\) confusion matrix tensor, got list"),
    ],
)
def test_not_a_confusion_matrix_raises(fn, cm, exc, match):
    with pytest.raises(exc, match=f"{fn.__name__}: cm must .*" + match):
        fn(cm)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_matrices_of_any_width_are_counts(dtype):
    cm = _cm()
    miou, iou = mean_iou(cm.to(dtype))
    ref_miou, ref_iou = mean_iou(cm)
    assert miou.item() == pytest.approx(ref_miou.item()) and torch.equal(iou, ref_iou)
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 2 / 4])


def test_a_square_label_map_is_read_as_counts():
    """Documented: a square, non-negative integer label map is also a table of counts; nothing can tell the two
    apart, so it is read as one (docs/pseudo_labels.md).  Its float, negative or non-square cousins raise."""
    labels = torch.randint(0, 6, (6, 6), generator=torch.Generator().manual_seed(0))
    miou, iou = mean_iou(labels)
    assert iou.shape == (6,) and 0 <= miou.item() <= 1


@given(st.integers(1, 6), st.integers(0, 60), st.integers(0, 2**31))
def test_fuzz_miou_of_confusion_matrices(C, n, seed):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (n,), generator=g)
    cm = confusion_matrix(pred, target, C)
    miou, iou = mean_iou(cm)
    present = torch.bincount(pred, minlength=C) + torch.bincount(target, minlength=C) > 0
    assert torch.equal(iou.isnan(), ~present)
    assert (iou[present] >= 0).all() and (iou[present] <= 1).all()
    assert math.isnan(miou.item()) == (n == 0)


# --------------------------------------------------------------------------- F-beta


def _masks():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 5, 5, generator=g) > 0.5, torch.rand(3, 5, 5, generator=g) > 0.5


@pytest.mark.parametrize(
    "valid, exc, match",
    [
        (
            torch.ones(3, 5, 5),
            TypeError,
            r"valid_mask must be a bool tensor of pred's shape \(3, 5, 5\), got torch.float32",
        ),
        (torch.ones(3, 5, 5, dtype=torch.long), TypeError, "valid_mask must be a bool tensor.*got torch.int64"),
        (
            torch.ones(3, 5, 6, dtype=torch.bool),
            ValueError,
            r"valid_mask must have pred's shape \(3, 5, 5\), got \(3, 5, 6\)",
        ),
        (
            torch.ones(5, 5, dtype=torch.bool),
            ValueError,
            r"valid_mask must have pred's shape \(3, 5, 5\), got \(5, 5\)",
        ),
        (torch.ones(1, 5, 5, dtype=torch.bool), ValueError, r"valid_mask must have pred's shape"),
        ([[True]], TypeError, "valid_mask must be a bool tensor.*got list"),
    ],
)
def test_fbeta_bad_valid_mask(valid, exc, match):
    pred, target = _masks()
    with pytest.raises(exc, match="fbeta_score: " + match):
        fbeta_score(pred, target, valid_mask=valid)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(pred=torch.ones(3, 5, 5)), ValueError, "pred and target must be bool tensors of one shape"),
        (
            dict(target=torch.ones(3, 5, 4, dtype=torch.bool)),
            ValueError,
            "pred and target must be bool tensors of one shape",
        ),
        (
            dict(pred=torch.tensor(True), target=torch.tensor(True)),
            ValueError,
            "pred and target must have a leading item dimension",
        ),
        (dict(pred=[[True]]), TypeError, "pred must be a bool tensor"),
        (dict(beta2=0.0), ValueError, "beta2 must be a positive finite number"),
        (dict(beta2=float("nan")), ValueError, "beta2 must be a positive finite number"),
        (dict(beta2=float("inf")), ValueError, "beta2 must be a positive finite number"),
        (dict(beta2=None), ValueError, "beta2 must be a positive finite number"),
    ],
)
def test_fbeta_bad_arguments(change, exc, match):
    pred, target = _masks()
    args = dict(pred=pred, target=target, beta2=0.3)
    args.update(change)
    with pytest.raises(exc, match="fbeta_score: " + match):
        fbeta_score(args["pred"], args["target"], beta2=args["beta2"])


def test_fbeta_valid_mask_leaves_pixels_out():
    pred, target = _masks()
    valid = torch.zeros(3, 5, 5, dtype=torch.bool)
    valid[:, :2] = True
    assert torch.equal(fbeta_score(pred, target, valid_mask=valid), fbeta_score(pred[:, :2], target[:, :2]))
    transposed = valid.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(fbeta_score(pred, target, valid_mask=transposed), fbeta_score(pred[:, :2], target[:, :2]))
