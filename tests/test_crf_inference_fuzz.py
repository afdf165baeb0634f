"""Hypothesis fuzzing of boxloss.dense_crf_inference: shapes, settings, masks, impossible labels and
colours against the reference (float64), and bad inputs that must raise a clear error, never crash."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from boxloss.reference.crf_inference import dense_crf_inference_reference  # noqa: E402

# Each example runs the PyTorch reference (slow): a third of the profile's examples.
_REFERENCE_EXAMPLES = max(10, settings().max_examples // 3)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    C = draw(st.integers(1, 6))
    H = draw(st.integers(1, 10))
    W = draw(st.integers(1, 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # Colours: continuous, quantised to few levels (exact ties in the lattice's rounding), or constant.
    kind = draw(st.sampled_from(["continuous", "levels", "constant"]))
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255
    if kind == "levels":
        image = torch.round(image / 64) * 64
    elif kind == "constant":
        image = torch.full_like(image, 37.0)
    unary = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 50.0]))
    if C > 1 and draw(st.booleans()):
        # Impossible labels: +inf anywhere but never for every class of a pixel.
        impossible = torch.rand(B, C, H, W, generator=g) < 0.4
        impossible[:, 0] = False
        unary = unary.masked_fill(impossible, float("inf"))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, H, W, generator=g) >= draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    kwargs = dict(
        bilateral=(
            draw(st.sampled_from([0.0, 0.5, 4.0, 20.0])),
            draw(st.sampled_from([0.5, 3.0, 55.0])),
            draw(st.sampled_from([1.0, 3.0, 15.0, 100.0])),
        ),
        gaussian=(draw(st.sampled_from([0.0, 1.0, 3.0])), draw(st.sampled_from([0.3, 1.0, 3.0, 20.0]))),
        iterations=draw(st.integers(1, 4)),
        valid_mask=mask,
    )
    return unary, image, kwargs


@settings(max_examples=_REFERENCE_EXAMPLES)
@given(problems())
def test_fuzz_matches_reference(problem):
    unary, image, kwargs = problem
    q = boxloss.dense_crf_inference(unary, image, **kwargs)
    ref = dense_crf_inference_reference(unary, image, **kwargs)
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-10)
    assert torch.all(q[unary == float("inf")] == 0)
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]))


@st.composite
def bad_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    B, C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    unary = torch.rand(B, C, H, W, generator=g)
    image = torch.rand(B, 3, H, W, generator=g) * 255
    kwargs = {}
    defect = draw(
        st.sampled_from(
            [
                "unary nan",
                "unary -inf",
                "unary all inf",
                "unary dtype",
                "unary dims",
                "image channels",
                "image shape",
                "image nan",
                "image dtype",
                "mask dtype",
                "mask shape",
                "bilateral sigma",
                "bilateral weight",
                "gaussian sigma",
                "gaussian weight",
                "iterations",
                "kernel tuple",
            ]
        )
    )
    b, c, y, x = (draw(st.integers(0, n - 1)) for n in (B, C, H, W))
    bad_number = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf")]))
    if defect == "unary nan":
        unary[b, c, y, x] = float("nan")
    elif defect == "unary -inf":
        unary[b, c, y, x] = -float("inf")
    elif defect == "unary all inf":
        unary[b, :, y, x] = float("inf")
    elif defect == "unary dtype":
        unary = unary.to(draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8])))
    elif defect == "unary dims":
        unary = unary[0] if draw(st.booleans()) else unary[None]
    elif defect == "image channels":
        image = image[:, : draw(st.sampled_from([1, 2]))] if draw(st.booleans()) else torch.cat([image, image], 1)
    elif defect == "image shape":
        image = image[..., 1:] if W > 1 else torch.cat([image, image], 3)
    elif defect == "image nan":
        image[b, draw(st.integers(0, 2)), y, x] = draw(st.sampled_from([float("nan"), float("inf")]))
    elif defect == "image dtype":
        image = image.to(draw(st.sampled_from([torch.int32, torch.int64, torch.bool])))
    elif defect == "mask dtype":
        kwargs["valid_mask"] = torch.ones(B, H, W, dtype=draw(st.sampled_from([torch.uint8, torch.float32])))
    elif defect == "mask shape":
        kwargs["valid_mask"] = torch.ones(B, H + 1, W, dtype=torch.bool)
    elif defect == "bilateral sigma":
        kwargs["bilateral"] = (4.0, 55.0, bad_number) if draw(st.booleans()) else (4.0, bad_number, 3.0)
    elif defect == "bilateral weight":
        kwargs["bilateral"] = (draw(st.sampled_from([-1.0, float("nan"), float("inf")])), 55.0, 3.0)
    elif defect == "gaussian sigma":
        kwargs["gaussian"] = (3.0, bad_number)
    elif defect == "gaussian weight":
        kwargs["gaussian"] = (draw(st.sampled_from([-0.5, float("nan"), float("inf")])), 3.0)
    elif defect == "iterations":
        kwargs["iterations"] = draw(st.sampled_from([0, -3, 2.5, None, True]))
    elif defect == "kernel tuple":
        kwargs[draw(st.sampled_from(["bilateral", "gaussian"]))] = draw(
            st.sampled_from([(), (1.0,), 3.0, None, (1, 2, 3, 4)])
        )
    return unary, image, kwargs


@settings(max_examples=max(50, settings().max_examples))
@given(bad_calls())
def test_fuzz_bad_input_raises_clear_error(call):
    unary, image, kwargs = call
    with pytest.raises((ValueError, TypeError)) as info:
        boxloss.dense_crf_inference(unary, image, **kwargs)
    assert str(info.value).startswith("dense_crf_inference: ")
