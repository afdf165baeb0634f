"""Hypothesis fuzzing of the box row/column-max op and the losses built on it:
arbitrary boxes (inside, outside, inverted, NaN, infinite, degenerate), any
stride, labels and batch indices in and out of range; NaN, Inf, huge values
and logits inside a box; double backward against the plain-PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from box_inputs import make_probs  # noqa: E402
from boxloss.reference.box_priors import (  # noqa: E402
    box_row_col_max_reference,
    mil_box_loss_reference,
    projection_loss_reference,
    tight_box_loss_reference,
)
from value_fuzz import assert_rejected, corrupt, hessian_vector_product  # noqa: E402

COORD = st.one_of(
    st.floats(-20, 60, allow_nan=False),
    st.integers(-3, 40).map(float),
    st.sampled_from([float("inf"), float("-inf")]),
)


@st.composite
def problems(draw, valid=True):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 4))
    H = draw(st.integers(1, 12))
    W = draw(st.integers(1, 12))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 0.125, 2.0, 0.3]))
    K = draw(st.integers(0, 6))
    boxes, batch, labels = [], [], []
    for _ in range(K):
        x0, x1 = sorted([draw(COORD), draw(COORD)])
        y0, y1 = sorted([draw(COORD), draw(COORD)])
        boxes.append([x0, y0, x1, y1])
        batch.append(draw(st.integers(0, B - 1)))
        labels.append(draw(st.integers(0, C - 1)))
    boxes = torch.tensor(boxes, dtype=torch.float64).reshape(K, 4)
    batch = torch.tensor(batch, dtype=torch.long).reshape(K)
    labels = torch.tensor(labels, dtype=torch.long).reshape(K)
    seed = draw(st.integers(0, 2**16))
    levels = draw(st.sampled_from([None, 2, 5]))
    return B, C, H, W, scale, boxes, batch, labels, seed, levels


@given(problems())
def test_fuzz_primitive_matches_reference(problem):
    B, C, H, W, scale, boxes, batch, labels, seed, levels = problem
    probs = make_probs(B, C, H, W, seed=seed, levels=levels).requires_grad_()
    row_max, col_max, _, _, ranges = torch.ops.boxloss.box_row_col_max(probs, boxes, batch, labels, scale)
    ref_row, ref_col, ref_ranges = box_row_col_max_reference(probs, boxes, batch, labels, scale)
    assert torch.equal(ranges, ref_ranges)
    assert torch.equal(row_max, ref_row) and torch.equal(col_max, ref_col)
    (g,) = torch.autograd.grad(row_max.sum() + 3 * col_max.sum(), probs, allow_unused=True)
    if ref_row.requires_grad:
        (g_ref,) = torch.autograd.grad(ref_row.sum() + 3 * ref_col.sum(), probs)
        assert torch.equal(g, g_ref)


@given(problems(), st.sampled_from(["tight", "both", "mil", "projection"]), st.sampled_from(["mean", "sum", "none"]))
def test_fuzz_losses_match_reference(problem, loss, reduction):
    B, C, H, W, scale, boxes, batch, labels, seed, _ = problem
    probs = make_probs(B, C, H, W, seed=seed, softmax=True)
    fast, ref = {
        "tight": (boxloss.tight_box_loss, tight_box_loss_reference),
        "both": (
            lambda *a, **k: boxloss.tight_box_loss(*a, mode="both", **k),
            lambda *a, **k: tight_box_loss_reference(*a, mode="both", **k),
        ),
        "mil": (boxloss.mil_box_loss, mil_box_loss_reference),
        "projection": (boxloss.projection_loss, projection_loss_reference),
    }[loss]
    x, xr = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    value = fast(x, boxes, batch, labels, spatial_scale=scale, reduction=reduction)
    ref_value = ref(xr, boxes, batch, labels, spatial_scale=scale, reduction=reduction)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(value).all()
    if ref_value.requires_grad:
        (g,) = torch.autograd.grad(value.sum(), x)
        (g_ref,) = torch.autograd.grad(ref_value.sum(), xr)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


@given(
    problems(),
    st.sampled_from(["nan", "inverted_x", "inverted_y", "batch_high", "batch_low", "label_high", "label_low"]),
    st.sampled_from([boxloss.box_row_col_max, boxloss.tight_box_loss, boxloss.mil_box_loss, boxloss.projection_loss]),
)
def test_fuzz_bad_boxes_raise(problem, corruption, fn):
    B, C, H, W, scale, boxes, batch, labels, seed, _ = problem
    if boxes.shape[0] == 0:
        boxes = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
        batch, labels = torch.tensor([0]), torch.tensor([0])
    k = seed % boxes.shape[0]
    boxes, batch, labels = boxes.clone(), batch.clone(), labels.clone()
    message = {
        "nan": "must not hold NaN",
        "inverted_x": "x1 >= x0",
        "inverted_y": "x1 >= x0",
        "batch_high": "box_batch must lie",
        "batch_low": "box_batch must lie",
        "label_high": "box_labels must lie",
        "label_low": "box_labels must lie",
    }[corruption]
    if corruption == "nan":
        boxes[k, seed % 4] = math.nan
    elif corruption == "inverted_x":
        boxes[k] = torch.tensor([5.0, 0.0, 4.0, 1.0], dtype=torch.float64)
    elif corruption == "inverted_y":
        boxes[k] = torch.tensor([0.0, 5.0, 1.0, 4.9], dtype=torch.float64)
    elif corruption == "batch_high":
        batch[k] = B + seed % 3
    elif corruption == "batch_low":
        batch[k] = -1 - seed % 3
    elif corruption == "label_high":
        labels[k] = C + seed % 3
    else:
        labels[k] = -1
    probs = make_probs(B, C, H, W, seed=seed)
    with pytest.raises(ValueError, match=message):
        fn(probs, boxes, batch, labels, spatial_scale=scale)


BOX_PRIORS = {
    "tight_box_loss": boxloss.tight_box_loss,
    "mil_box_loss": boxloss.mil_box_loss,
    "projection_loss": boxloss.projection_loss,
}
# The losses read probs through the row and column maxima of the boxes (and, for MIL and projection, of whole
# image rows and columns): a value that raises a maximum out of [0, 1] (or NaN anywhere in a box) must raise.
MAXIMUM_CORRUPTIONS = ["nan", "inf", "above_one", "huge", "logits"]


def _inside_box(problem):
    """(problem with at least one non-empty box, the flat index of a pixel of box 0's class channel inside it)."""
    B, C, H, W, scale, boxes, batch, labels, seed, levels = problem
    boxes = torch.cat([torch.tensor([[0.0, 0.0, W / scale, H / scale]], dtype=torch.float64), boxes])
    batch, labels = torch.cat([torch.tensor([seed % B]), batch]), torch.cat([torch.tensor([seed % C]), labels])
    row, col = seed % H, (seed // 7) % W
    index = ((batch[0] * C + labels[0]) * H + row) * W + col
    return (B, C, H, W, scale, boxes, batch, labels, seed, levels), int(index)


@given(problems(), st.sampled_from(sorted(BOX_PRIORS)), st.sampled_from(MAXIMUM_CORRUPTIONS))
def test_fuzz_bad_probabilities_raise(problem, name, kind):
    (B, C, H, W, scale, boxes, batch, labels, seed, _), index = _inside_box(problem)
    probs = corrupt(make_probs(B, C, H, W, seed=seed, softmax=True), kind, index, seed)
    # NaN inside a box is an error of the op the priors share.
    assert_rejected(
        (name, "box_row_col_max"), "probs", lambda: BOX_PRIORS[name](probs, boxes, batch, labels, spatial_scale=scale)
    )


@given(problems(), st.sampled_from(sorted(BOX_PRIORS)), st.sampled_from(["-inf", "below_zero", "-huge"]))
def test_fuzz_low_values_give_a_finite_loss_or_raise(problem, name, kind):
    # A value below 0 is read only when it is the maximum of a row or column (all of which is below 0): then it
    # raises; otherwise the loss does not depend on it and is finite.
    (B, C, H, W, scale, boxes, batch, labels, seed, _), index = _inside_box(problem)
    probs = corrupt(make_probs(B, C, H, W, seed=seed, softmax=True), kind, index, seed)
    try:
        value = BOX_PRIORS[name](probs, boxes, batch, labels, spatial_scale=scale)
    except ValueError as error:
        assert str(error).startswith(f"{name}: probs must hold probabilities in [0, 1]")
    else:
        assert torch.isfinite(value).all()


@settings(max_examples=40)
@given(problems(), st.sampled_from(["row_col_max", "tight", "both", "mil", "projection"]))
def test_fuzz_double_backward_matches_reference(problem, loss):
    # The reference is plain PyTorch, which autograd differentiates twice.
    B, C, H, W, scale, boxes, batch, labels, seed, levels = problem
    probs = make_probs(B, C, H, W, seed=seed, levels=levels).clamp(0.02, 0.98)
    v = torch.randn(probs.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def row_col(fn):
        def loss_fn(p):
            row, col = fn(p)[:2]
            return (row.square() * torch.arange(1.0, H + 1, dtype=p.dtype)).sum() + col.pow(3).sum()

        return loss_fn

    fast, ref = {
        "row_col_max": (
            row_col(lambda p: torch.ops.boxloss.box_row_col_max(p, boxes, batch, labels, scale)),
            row_col(lambda p: box_row_col_max_reference(p, boxes, batch, labels, scale)),
        ),
        "tight": (boxloss.tight_box_loss, tight_box_loss_reference),
        "both": (
            lambda *a, **k: boxloss.tight_box_loss(*a, mode="both", **k),
            lambda *a, **k: tight_box_loss_reference(*a, mode="both", **k),
        ),
        "mil": (boxloss.mil_box_loss, mil_box_loss_reference),
        "projection": (boxloss.projection_loss, projection_loss_reference),
    }[loss]
    if loss != "row_col_max":
        fast_fn, ref_fn = fast, ref
        fast = lambda p: fast_fn(p, boxes, batch, labels, spatial_scale=scale)  # noqa: E731
        ref = lambda p: ref_fn(p, boxes, batch, labels, spatial_scale=scale)  # noqa: E731
    (h,) = hessian_vector_product(fast, [probs], [v])
    (h_ref,) = hessian_vector_product(ref, [probs], [v])
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-10)
