"""Hypothesis fuzzing of the uncertainty losses over shapes, settings and bad inputs: NaN and Inf in every float
argument (and values outside [0, 1] in a probability target), huge logits, and double backward, which raises."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from boxloss.reference import uncertainty_bce_loss_reference, uncertainty_ce_loss_reference  # noqa: E402
from uncertainty_inputs import make_binary_inputs, make_class_inputs, value_and_grads  # noqa: E402
from value_fuzz import FINITE, PROBABILITIES, assert_rejected, bad_values, corrupt  # noqa: E402


@st.composite
def class_problems(draw):
    B, C = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 21))
    kwargs = dict(
        samples=draw(st.integers(1, 12)),
        seed=draw(
            st.one_of(st.integers(-(2**63), 2**64 - 1), st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)))
        ),
        tau=draw(st.floats(0.05, 20.0)),
        bootstrap=draw(st.booleans()),
        route_gradients=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([255, -100, 0 if C > 1 else 255])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    inputs = dict(
        mu_scale=draw(st.sampled_from([0.1, 2.0, 30.0])),
        log_var_shift=draw(st.sampled_from([-6.0, 0.0, 3.0])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        box_fraction=draw(st.sampled_from([None, 0.0, 0.5, 1.0])),
        pixel_perfect=draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=B, max_size=B))),
        seed=draw(st.integers(0, 2**16)),
    )
    return (B, C, H, W), inputs, kwargs


def _reference(mu, log_var, target, *, seed, **kwargs):
    seed, offset = seed if isinstance(seed, tuple) else (seed, 0)
    return uncertainty_ce_loss_reference(mu, log_var, target, seed=seed, offset=offset, **kwargs)


@settings(max_examples=60)
@given(class_problems())
def test_fuzz_ce_matches_reference(problem):
    (B, C, H, W), inputs, kwargs = problem
    mu, log_var, target, box_mask, pp = make_class_inputs(B, C, H, W, ignore_index=kwargs["ignore_index"], **inputs)
    kwargs.update(box_mask=box_mask, pixel_perfect=pp)
    value, grad_mu, grad_s = value_and_grads(boxloss.uncertainty_ce_loss, mu, log_var, target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_reference, mu, log_var, target, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-9, atol=1e-11)


@settings(max_examples=40)
@given(class_problems())
def test_fuzz_ce_float32_finite_and_close(problem):
    (B, C, H, W), inputs, kwargs = problem
    mu, log_var, target, box_mask, pp = make_class_inputs(B, C, H, W, ignore_index=kwargs["ignore_index"], **inputs)
    kwargs.update(box_mask=box_mask, pixel_perfect=pp, reduction="none")
    value, grad_mu, grad_s = value_and_grads(boxloss.uncertainty_ce_loss, mu.float(), log_var.float(), target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_reference, mu, log_var, target, **kwargs)
    for t in (value, grad_mu, grad_s):
        assert torch.isfinite(t).all()
    scale = 1 + ref_value.abs()
    assert ((value.double() - ref_value).abs() / scale).max() < 1e-4
    assert (grad_mu.double() - ref_mu).abs().max() < 1e-3 * (1 + ref_mu.abs().max())
    assert (grad_s.double() - ref_s).abs().max() < 1e-3 * (1 + ref_s.abs().max())


def _reference_with_void(void, reduction):
    """The reference per pixel, 0 at void pixels, reduced over the others (the binary losses' void contract)."""

    def loss(mu, log_var, target, box_mask, **kwargs):
        per_pixel = uncertainty_bce_loss_reference(mu, log_var, target, box_mask, reduction="none", **kwargs)
        per_pixel = per_pixel.masked_fill(void, 0.0)
        if reduction == "mean":
            return per_pixel.sum() / max(int((~void).sum()), 1)
        return per_pixel.sum() if reduction == "sum" else per_pixel

    return loss


@settings(max_examples=60)
@given(
    st.integers(1, 3),
    st.integers(1, 7),
    st.integers(1, 19),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.floats(-5.0, 10.0),
    st.floats(0.01, 2.0),
    st.sampled_from([None, 0.0, 0.5, 1.0]),
    st.sampled_from(["mean", "sum", "none"]),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.integers(0, 2**16),
)
def test_fuzz_bce_matches_reference(
    B, H, W, bootstrap, route, soft, tau, temperature, box_fraction, reduction, void_fraction, seed
):
    mu, log_var, target, box_mask, _ = make_binary_inputs(B, H, W, seed=seed, soft=soft, box_fraction=box_fraction)
    void = torch.rand(B, H, W, generator=torch.Generator().manual_seed(seed + 1)) < void_fraction
    pp = torch.arange(B) % 2 == 1
    kwargs = dict(tau=tau, temperature=temperature, bootstrap=bootstrap, route_gradients=route, pixel_perfect=pp)
    with_void = target.masked_fill(void, 255)
    value, grad_mu, grad_s = value_and_grads(
        boxloss.uncertainty_bce_loss, mu, log_var, with_void, box_mask, reduction=reduction, **kwargs
    )
    ref_value, ref_mu, ref_s = value_and_grads(
        _reference_with_void(void, reduction), mu, log_var, target, box_mask, **kwargs
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-9, atol=1e-11)


@st.composite
def bad_ce_calls(draw):
    """Argument mutations that must raise TypeError or ValueError, never crash."""
    B, C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    mu, log_var, target, box_mask, pp = make_class_inputs(
        B, C, H, W, dtype=torch.float32, box_fraction=0.5, pixel_perfect=[True] * B
    )
    args = dict(mu=mu, log_var=log_var, target=target, box_mask=box_mask, pixel_perfect=pp, seed=1)
    mutation = draw(
        st.sampled_from(
            [
                "samples",
                "tau",
                "target_value",
                "target_dtype",
                "shape",
                "mask",
                "pp",
                "seed",
                "reduction",
                "ignore_index",
            ]
        )
    )
    if mutation == "samples":
        args["samples"] = draw(st.one_of(st.integers(-5, 0), st.just(2**31), st.floats(0.5, 3.0)))
    elif mutation == "tau":
        args["tau"] = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1"]))
    elif mutation == "target_value":
        bad = draw(st.one_of(st.integers(C, C + 300).filter(lambda v: v != 255), st.integers(-1000, -1)))
        t = target.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = bad
        args["target"] = t
    elif mutation == "target_dtype":
        args["target"] = target.to(draw(st.sampled_from([torch.float32, torch.bool, torch.float64])))
    elif mutation == "shape":
        args[draw(st.sampled_from(["mu", "log_var", "target"]))] = draw(
            st.sampled_from(
                [mu[:, :, :, :0], mu[0], log_var[:, :, :1, :1] if H * W > 1 else log_var[:, :, :, :0], target[:, None]]
            )
        )
    elif mutation == "mask":
        args["box_mask"] = draw(
            st.sampled_from([box_mask.float(), box_mask[:, None].expand(-1, 2, -1, -1), box_mask[:, :0]])
        )
    elif mutation == "pp":
        args["pixel_perfect"] = draw(st.sampled_from([pp.float(), torch.ones(B + 1, dtype=torch.bool), pp[None]]))
    elif mutation == "seed":
        args["seed"] = draw(st.sampled_from([2**64, -(2**63) - 1, 1.0, "1", (1, 2**32), (1, -1), (1,)]))
    elif mutation == "reduction":
        args["reduction"] = draw(st.text(max_size=5).filter(lambda r: r not in ("mean", "sum", "none")))
    else:
        args["ignore_index"] = draw(st.sampled_from([255.0, None, "255"]))
    return args


@given(bad_ce_calls())
def test_fuzz_ce_bad_input_raises(args):
    mu, log_var, target = args.pop("mu"), args.pop("log_var"), args.pop("target")
    with pytest.raises((TypeError, ValueError)):
        boxloss.uncertainty_ce_loss(mu, log_var, target, **args)


@settings(max_examples=60)
@given(class_problems(), st.sampled_from(["mu", "log_var"]), st.data())
def test_fuzz_ce_non_finite_inputs_raise(problem, argument, data):
    # Anywhere: inside or outside the boxes, ignored or not, pixel-perfect or not.
    (B, C, H, W), inputs, kwargs = problem
    mu, log_var, target, box_mask, pp = make_class_inputs(B, C, H, W, ignore_index=kwargs["ignore_index"], **inputs)
    args = {"mu": mu, "log_var": log_var}
    args[argument] = corrupt(args[argument], data.draw(bad_values(FINITE)), data.draw(st.integers(0, 2**16)))
    assert_rejected(
        "uncertainty_ce_loss",
        argument,
        lambda: boxloss.uncertainty_ce_loss(
            args["mu"], args["log_var"], target, box_mask=box_mask, pixel_perfect=pp, **kwargs
        ),
    )


@settings(max_examples=60)
@given(
    st.integers(1, 3),
    st.integers(1, 7),
    st.integers(1, 9),
    st.sampled_from(["mu", "log_var", "target"]),
    st.sampled_from([None, 0.5, 1.0]),
    st.sampled_from(["uncertainty_bce_loss", "uncertainty_l2_loss"]),
    st.data(),
)
def test_fuzz_binary_bad_values_raise(B, H, W, argument, box_fraction, name, data):
    mu, log_var, target, box_mask, _ = make_binary_inputs(B, H, W, seed=data.draw(st.integers(0, 99)), soft=True)
    box_mask = None if box_fraction is None else box_mask
    domain = PROBABILITIES if argument == "target" and name == "uncertainty_bce_loss" else FINITE
    args = {"mu": mu, "log_var": log_var, "target": target}
    args[argument] = corrupt(args[argument], data.draw(bad_values(domain)), data.draw(st.integers(0, 2**16)))
    fn = getattr(boxloss, name)
    assert_rejected(name, argument, lambda: fn(args["mu"], args["log_var"], args["target"], box_mask))


@settings(max_examples=40)
@given(class_problems(), st.sampled_from([1e30, -1e30, 1e100]))
def test_fuzz_ce_huge_mean_is_finite(problem, huge):
    # Huge but finite logits: the loss and its gradients stay finite (float64).
    (B, C, H, W), inputs, kwargs = problem
    mu, log_var, target, box_mask, pp = make_class_inputs(B, C, H, W, ignore_index=kwargs["ignore_index"], **inputs)
    mu = mu.clone()
    mu.view(-1)[inputs["seed"] % mu.numel()] = huge
    kwargs.update(box_mask=box_mask, pixel_perfect=pp)
    value, grad_mu, grad_s = value_and_grads(boxloss.uncertainty_ce_loss, mu, log_var, target, **kwargs)
    for t in (value, grad_mu, grad_s):
        assert torch.isfinite(t).all()


@settings(max_examples=30)
@given(class_problems(), st.booleans())
def test_fuzz_double_backward_raises(problem, binary):
    (B, C, H, W), inputs, kwargs = problem
    if binary:
        mu, log_var, target, box_mask, _ = make_binary_inputs(B, H, W, seed=inputs["seed"])
        name = "uncertainty_bce_loss"
        loss_fn = lambda m, s: boxloss.uncertainty_bce_loss(m, s, target, box_mask)  # noqa: E731
    else:
        mu, log_var, target, box_mask, pp = make_class_inputs(B, C, H, W, ignore_index=kwargs["ignore_index"], **inputs)
        kwargs.update(box_mask=box_mask, pixel_perfect=pp, reduction="sum")
        name = "uncertainty_ce_loss"
        loss_fn = lambda m, s: boxloss.uncertainty_ce_loss(m, s, target, **kwargs)  # noqa: E731
    mu, log_var = mu.requires_grad_(), log_var.requires_grad_()
    g_mu, g_s = torch.autograd.grad(loss_fn(mu, log_var), (mu, log_var), create_graph=True)
    if not (g_mu.requires_grad or g_s.requires_grad):
        return
    with pytest.raises(boxloss.DoubleBackwardError, match=f"^{name}: double backward is not implemented"):
        torch.autograd.grad((g_mu.square().sum() + g_s.square().sum()), (mu, log_var), allow_unused=True)
