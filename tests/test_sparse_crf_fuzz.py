"""Hypothesis fuzzing of boxloss.sparse_crf_loss over shapes and arguments, NaN, Inf, huge values and logits in
every float argument, and double backward against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from sparse_crf_inputs import make_inputs, op_value_and_grad, reference_value_and_grad  # noqa: E402
from value_fuzz import FINITE, PROBABILITIES, assert_rejected, bad_values, corrupt, hessian_vector_product  # noqa: E402


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 5))
    H = draw(st.integers(1, 14))
    W = draw(st.integers(1, 14))
    K = draw(st.integers(1, 4))
    kwargs = dict(
        sigma=draw(st.floats(0.01, 5.0)),
        neighbourhood=draw(st.sampled_from([4, 8])),
        dilation=draw(st.integers(1, 16)),
        kind=draw(st.sampled_from(["l1", "potts"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        chosen = draw(st.lists(st.integers(0, C - 1), min_size=1, max_size=C, unique=True))
        kwargs["channels"] = [c - C if draw(st.booleans()) else c for c in chosen]
    mask_fraction = draw(st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return (B, C, H, W, K, mask_fraction, seed), kwargs


@given(problems())
def test_fuzz_matches_reference(problem):
    (B, C, H, W, K, mask_fraction, seed), kwargs = problem
    probs, image, mask = make_inputs(B, C, H, W, K=K, mask_fraction=mask_fraction, seed=seed)
    value, grad = op_value_and_grad(probs, image, valid_mask=mask, **kwargs)
    ref_value, ref_grad = reference_value_and_grad(probs, image, valid_mask=mask, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@given(problems(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fuzz_low_precision_is_finite_and_close(problem, dtype):
    (B, C, H, W, K, mask_fraction, seed), kwargs = problem
    probs, image, mask = make_inputs(B, C, H, W, K=K, mask_fraction=mask_fraction, seed=seed)
    p, im = probs.to(dtype), image.to(dtype)
    value, grad = op_value_and_grad(p, im, valid_mask=mask, **kwargs)
    exact, exact_grad = reference_value_and_grad(p.double(), im.double(), valid_mask=mask, **kwargs)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    tol = 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    scale = max(exact.abs().max().item(), 1e-3)
    assert (value.double() - exact).abs().max().item() <= tol * scale * 4 + 1e-7
    grad_scale = max(exact_grad.abs().max().item(), 1e-6)
    assert (grad.double() - exact_grad).abs().max().item() <= tol * grad_scale * 4 + 1e-7


@st.composite
def bad_calls(draw):
    """Argument mutations that must raise TypeError or ValueError, never crash."""
    B, C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    probs, image, mask = make_inputs(B, C, H, W, dtype=torch.float32, mask_fraction=0.2, seed=1)
    args = dict(probs=probs, image=image, valid_mask=mask)
    mutation = draw(
        st.sampled_from(
            [
                "sigma",
                "neighbourhood",
                "dilation",
                "kind",
                "reduction",
                "channels",
                "probs_shape",
                "image_shape",
                "mask_shape",
                "probs_values",
                "probs_logits",
                "image_values",
                "dtype",
            ]
        )
    )
    if mutation == "sigma":
        args["sigma"] = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf")]))
    elif mutation == "neighbourhood":
        args["neighbourhood"] = draw(st.integers(-3, 20).filter(lambda n: n not in (4, 8)))
    elif mutation == "dilation":
        args["dilation"] = draw(st.integers(-5, 0))
    elif mutation == "kind":
        args["kind"] = draw(st.text(max_size=5).filter(lambda k: k not in ("l1", "potts")))
    elif mutation == "reduction":
        args["reduction"] = draw(st.text(max_size=5).filter(lambda r: r not in ("mean", "sum", "none")))
    elif mutation == "channels":
        args["channels"] = draw(
            st.one_of(
                st.just([]),
                st.lists(st.integers(C, C + 5), min_size=1, max_size=3),
                st.lists(st.integers(-C - 5, -C - 1), min_size=1, max_size=3),
            )
        )
    elif mutation == "probs_shape":
        args["probs"] = probs.reshape(-1) if draw(st.booleans()) else probs[..., None]
    elif mutation == "image_shape":
        args["image"] = image[:, :, : max(H - 1, 0)] if H > 1 else image[:, :, :, :0]
    elif mutation == "mask_shape":
        args["valid_mask"] = mask[..., None]
    elif mutation == "probs_values":
        bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.5, 1.5, 1e30]))
        p = probs.clone()
        p.view(-1)[draw(st.integers(0, p.numel() - 1))] = bad
        args["probs"] = p
    elif mutation == "probs_logits":
        args["probs"] = corrupt(probs, "logits", 0, draw(st.integers(0, 100)))
    elif mutation == "image_values":
        bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        im = image.clone()
        im.view(-1)[draw(st.integers(0, im.numel() - 1))] = bad
        args["image"] = im
    else:
        args["image"] = image.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32])))
    return args


@given(bad_calls())
def test_fuzz_bad_input_raises(args):
    probs, image = args.pop("probs"), args.pop("image")
    with pytest.raises((TypeError, ValueError)):
        boxloss.sparse_crf_loss(probs, image, **args)


@given(
    problems(),
    st.sampled_from(["probs", "image"]),
    st.data(),
)
def test_fuzz_bad_values_raise_naming_the_argument(problem, argument, data):
    (B, C, H, W, K, mask_fraction, seed), kwargs = problem
    probs, image, mask = make_inputs(B, C, H, W, K=K, mask_fraction=mask_fraction, seed=seed)
    kind = data.draw(bad_values(PROBABILITIES if argument == "probs" else FINITE))
    args = {"probs": probs, "image": image}
    channels = kwargs.get("channels")
    index = data.draw(st.integers(0, 2**16))
    if argument == "probs" and channels is not None:
        # A value in a channel the loss does not read is not checked: corrupt a selected one.
        b, c, p = index % B, channels[index % len(channels)] % C, index % (H * W)
        index = (b * C + c) * H * W + p
    args[argument] = corrupt(args[argument], kind, index, seed)
    assert_rejected("sparse_crf_loss", argument, lambda: boxloss.sparse_crf_loss(**args, valid_mask=mask, **kwargs))


@settings(max_examples=60)
@given(problems(), st.sampled_from([None, "huge"]))
def test_fuzz_double_backward_matches_reference(problem, image_values):
    # Hessian-vector products of the op (its backward op's own autograd formula) against autograd through the
    # plain-PyTorch reference; huge colours only make the weights 0.
    from boxloss.reference import sparse_crf_loss_reference

    (B, C, H, W, K, mask_fraction, seed), kwargs = problem
    probs, image, mask = make_inputs(B, C, H, W, K=K, mask_fraction=mask_fraction, seed=seed)
    if image_values == "huge":
        image = corrupt(image, "huge", seed, seed)
    v = torch.randn(probs.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    kwargs = dict(kwargs, valid_mask=mask, reduction="sum")
    (h,) = hessian_vector_product(lambda p: boxloss.sparse_crf_loss(p, image, **kwargs), [probs], [v])
    (h_ref,) = hessian_vector_product(lambda p: sparse_crf_loss_reference(p, image, **kwargs), [probs], [v])
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(h).all()
