"""Hypothesis fuzzing of background attention and background-aware pooling:
any shape, grid and output size, boxes inside, outside, degenerate, infinite or
covering everything, any stride and minimum background, against the references
(values and feature gradients), and bad boxes raising like the reference; NaN,
Inf, huge values and out-of-range attention in every float argument, and
double backward, which raises."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from boxloss.reference.background_attention import (  # noqa: E402
    background_attention_reference,
    background_aware_pool_reference,
)
from value_fuzz import FINITE, PROBABILITIES, assert_rejected, bad_values, corrupt  # noqa: E402

COORD = st.one_of(
    st.floats(-20, 60, allow_nan=False),
    st.integers(-3, 40).map(float),
    st.sampled_from([float("inf"), float("-inf")]),
)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    D = draw(st.integers(1, 4))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 2.0, 0.3]))
    K = draw(st.integers(0, 5))
    boxes, batch = [], []
    for _ in range(K):
        x0, x1 = sorted([draw(COORD), draw(COORD)])
        y0, y1 = sorted([draw(COORD), draw(COORD)])
        boxes.append([x0, y0, x1, y1])
        batch.append(draw(st.integers(0, B - 1)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, h, w, generator=g, dtype=torch.float64) + 0.2
    return (
        f,
        torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        torch.tensor(batch, dtype=torch.long),
        scale,
        draw(st.integers(1, 5)),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([0.0, 0.125, 0.5])),
    )


@settings(max_examples=60)
@given(problems())
def test_fuzz_against_reference(problem):
    f, boxes, batch, scale, grid, S, min_bg = problem
    x1 = f.clone().requires_grad_(True)
    x2 = f.clone().requires_grad_(True)
    bap = boxloss.BackgroundAwarePooling(grid_size=grid, output_size=S, spatial_scale=scale, min_background=min_bg)
    pooled, att = bap(x1, boxes, batch)
    ref_att, ref_q, ref_valid, ref_fallback = background_attention_reference(
        x2, boxes, batch, grid_size=grid, spatial_scale=scale, min_background=min_bg
    )
    ref_pooled = background_aware_pool_reference(x2, ref_att, boxes, batch, output_size=S, spatial_scale=scale)
    torch.testing.assert_close(att.attention, ref_att, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(att.queries, ref_q, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-6, atol=1e-9)
    assert torch.equal(att.valid, ref_valid) and torch.equal(att.fallback, ref_fallback)
    (pooled.sum() + att.queries.sum() + att.attention.sum()).backward()
    (ref_pooled.sum() + ref_q.sum() + ref_att.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-8)


@settings(max_examples=30)
@given(problems(), st.sampled_from(["nan", "inverted", "batch"]))
def test_fuzz_bad_boxes_raise(problem, kind):
    f, boxes, batch, scale, grid, S, _ = problem
    bad_box = {"nan": [math.nan, 0.0, 3.0, 3.0], "inverted": [5.0, 0.0, 3.0, 3.0], "batch": [0.0, 0.0, 3.0, 3.0]}[kind]
    boxes = torch.cat([boxes, torch.tensor([bad_box], dtype=torch.float64)])
    batch = torch.cat([batch, torch.tensor([f.shape[0] if kind == "batch" else 0])])
    with pytest.raises(ValueError):
        boxloss.background_attention(f, boxes, batch, grid_size=grid, spatial_scale=scale)
    with pytest.raises(ValueError):
        boxloss.background_aware_pool(
            f, torch.zeros(f.shape[0], *f.shape[2:], dtype=f.dtype), boxes, batch, output_size=S, spatial_scale=scale
        )
    with pytest.raises(ValueError):
        background_attention_reference(f, boxes, batch, grid_size=grid, spatial_scale=scale)


@settings(max_examples=60)
@given(problems(), st.sampled_from(["attention", "pool", "fused"]), st.data())
def test_fuzz_bad_values_raise_naming_the_argument(problem, op, data):
    f, boxes, batch, scale, grid, S, min_bg = problem
    attention = torch.rand(f.shape[0], *f.shape[2:], generator=torch.Generator().manual_seed(3), dtype=f.dtype)
    argument = data.draw(st.sampled_from(["features", "attention"] if op == "pool" else ["features"]))
    index = data.draw(st.integers(0, 2**16))
    if argument == "features":
        f = corrupt(f, data.draw(bad_values(FINITE)), index)
    else:
        attention = corrupt(attention, data.draw(bad_values(PROBABILITIES)), index)
    if op == "attention":
        call, names = (
            lambda: boxloss.background_attention(f, boxes, batch, grid_size=grid, spatial_scale=scale),
            ("background_attention",),
        )
    elif op == "pool":
        call = lambda: boxloss.background_aware_pool(  # noqa: E731
            f, attention, boxes, batch, output_size=S, spatial_scale=scale
        )
        names = ("background_aware_pool",)
    else:
        bap = boxloss.BackgroundAwarePooling(grid_size=grid, output_size=S, spatial_scale=scale, min_background=min_bg)
        call, names = lambda: bap(f, boxes, batch), ("background_attention",)
    assert_rejected(names, argument, call)


@settings(max_examples=30)
@given(problems(), st.sampled_from(["attention", "pool", "fused"]))
def test_fuzz_double_backward_raises(problem, op):
    f, boxes, batch, scale, grid, S, min_bg = problem
    f = f.requires_grad_()
    if op == "attention":
        out = boxloss.background_attention(f, boxes, batch, grid_size=grid, spatial_scale=scale)
        loss, name = out.attention.square().sum() + out.queries.square().sum(), "background_attention"
    elif op == "pool":
        a = torch.rand(f.shape[0], *f.shape[2:], dtype=f.dtype)
        loss = boxloss.background_aware_pool(f, a, boxes, batch, output_size=S, spatial_scale=scale).square().sum()
        name = "background_aware_pool"
    else:
        bap = boxloss.BackgroundAwarePooling(grid_size=grid, output_size=S, spatial_scale=scale, min_background=min_bg)
        pooled, att = bap(f, boxes, batch)
        loss, name = pooled.square().sum() + att.attention.sum(), "BackgroundAwarePooling"
    (g,) = torch.autograd.grad(loss, f, create_graph=True)
    if not g.requires_grad:  # nothing in the loss depends on the features (e.g. no box and no query)
        return
    with pytest.raises(boxloss.DoubleBackwardError, match=f"^{name}: double backward is not implemented"):
        torch.autograd.grad(g.square().sum(), f)
