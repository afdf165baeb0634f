"""Hypothesis fuzzing of the lattice, bilateral_filter and dense_crf_loss over shapes,
sigmas, masks and bad inputs: NaN, Inf, huge values and logits in every float
argument, and double backward against the plain-PyTorch lattice reference."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import boxloss  # noqa: E402
from boxloss.ops.lattice import LatticeTensors  # noqa: E402
from boxloss.reference import dense_crf_loss_lattice_reference  # noqa: E402
from boxloss.reference.bilateral import lattice_filter_reference, permutohedral_lattice_reference  # noqa: E402
from dense_crf_inputs import value_and_grad  # noqa: E402
from value_fuzz import FINITE, PROBABILITIES, assert_rejected, bad_values, corrupt, hessian_vector_product  # noqa: E402

# Each example runs the PyTorch reference lattice (slow): a third of the
# profile's examples keeps the file within a few seconds.
_REFERENCE_EXAMPLES = max(10, settings().max_examples // 3)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    C = draw(st.integers(1, 4))
    H = draw(st.integers(1, 9))
    W = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # Colours: continuous, quantised to few levels (exact ties in the lattice's
    # rounding and ranking), or constant.
    kind = draw(st.sampled_from(["continuous", "levels", "constant"]))
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255
    if kind == "levels":
        image = torch.round(image / 64) * 64
    elif kind == "constant":
        image = torch.full_like(image, 37.0)
    probs = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2).softmax(1)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, H, W, generator=g) >= draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    kwargs = dict(
        sigma_xy=draw(st.sampled_from([0.3, 1.0, 4.0, 80.0])),
        sigma_rgb=draw(st.sampled_from([1.0, 15.0, 100.0])),
        valid_mask=mask,
        normalize=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    return probs, image, kwargs


@settings(max_examples=_REFERENCE_EXAMPLES)
@given(problems())
def test_fuzz_loss_matches_lattice_reference(problem):
    probs, image, kwargs = problem
    value, grad = value_and_grad(boxloss.dense_crf_loss, probs, image, **kwargs)
    ref_value, ref_grad = value_and_grad(dense_crf_loss_lattice_reference, probs, image, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    per_image = boxloss.dense_crf_loss(probs, image, **dict(kwargs, reduction="none"))
    assert torch.all(per_image >= -1e-12)
    if kwargs["normalize"]:
        assert torch.all(per_image <= 1 + 1e-12)


@settings(max_examples=_REFERENCE_EXAMPLES)
@given(problems(), st.booleans())
def test_fuzz_lattice_and_filter_match_reference(problem, reverse):
    probs, image, kwargs = problem
    sigma_xy, sigma_rgb = kwargs["sigma_xy"], kwargs["sigma_rgb"]
    lattice = boxloss.PermutohedralLattice(image, sigma_xy, sigma_rgb)
    ref = LatticeTensors(*permutohedral_lattice_reference(image, sigma_xy, sigma_rgb))
    assert torch.equal(lattice.tensors.splat_index, ref.splat_index)
    assert torch.equal(lattice.tensors.blur_neighbours, ref.blur_neighbours)
    out = lattice.filter(probs, reverse=reverse)
    torch.testing.assert_close(out, lattice_filter_reference(probs, ref, reverse=reverse), rtol=1e-6, atol=1e-12)
    single_lattice = boxloss.PermutohedralLattice(image.float(), sigma_xy, sigma_rgb)
    single = single_lattice.filter(probs.float(), reverse=reverse)
    assert torch.isfinite(single).all()
    # float32 rounding may move a point near a simplex boundary into the
    # neighbouring simplex; where it does not, the outputs agree to float precision.
    if torch.equal(single_lattice.tensors.splat_index, ref.splat_index) and torch.equal(
        single_lattice.tensors.blur_neighbours, ref.blur_neighbours
    ):
        assert (single.double() - out).abs().max() <= 1e-4 * max(1.0, out.abs().max().item())


@st.composite
def bad_calls(draw):
    """Argument mutations that must raise TypeError or ValueError, never crash."""
    B, C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 100)))
    probs = torch.rand(B, C, H, W, generator=g).softmax(1)
    image = torch.rand(B, 3, H, W, generator=g) * 255
    args = dict(probs=probs, image=image)
    mutation = draw(
        st.sampled_from(
            [
                "sigma_xy",
                "sigma_rgb",
                "scale_factor",
                "image_channels",
                "image_values",
                "probs_values",
                "probs_shape",
                "mask",
                "reduction",
            ]
        )
    )
    bad_number = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf")])
    if mutation in ("sigma_xy", "sigma_rgb", "scale_factor"):
        args[mutation] = draw(bad_number)
    elif mutation == "image_channels":
        k = draw(st.sampled_from([1, 2, 4, 6]))
        args["image"] = torch.rand(B, k, H, W, generator=g)
    elif mutation == "image_values":
        im = image.clone()
        im.view(-1)[draw(st.integers(0, im.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
        args["image"] = im
    elif mutation == "probs_values":
        p = probs.clone()
        p.view(-1)[draw(st.integers(0, p.numel() - 1))] = draw(st.sampled_from([float("nan"), -0.5, 1.5, 1e30]))
        args["probs"] = p
    elif mutation == "probs_shape":
        args["probs"] = probs[0] if draw(st.booleans()) else probs[..., None]
    elif mutation == "mask":
        args["valid_mask"] = draw(st.sampled_from([torch.ones(B, H, W), torch.ones(B, H + 1, W, dtype=torch.bool)]))
    else:
        args["reduction"] = draw(st.text(max_size=4).filter(lambda r: r not in ("mean", "sum", "none")))
    return args


@given(bad_calls())
def test_fuzz_bad_input_raises(args):
    probs, image = args.pop("probs"), args.pop("image")
    with pytest.raises((TypeError, ValueError)):
        boxloss.dense_crf_loss(probs, image, **args)


@given(problems(), st.sampled_from(["probs", "image"]), st.data())
def test_fuzz_bad_values_raise_naming_the_argument(problem, argument, data):
    probs, image, kwargs = problem
    kind = data.draw(bad_values(PROBABILITIES if argument == "probs" else FINITE))
    args = {"probs": probs, "image": image}
    args[argument] = corrupt(args[argument], kind, data.draw(st.integers(0, 2**16)), 0)
    # The image is checked by the lattice the loss builds from it.
    names = ("dense_crf_loss", "permutohedral_lattice")
    assert_rejected(names, argument, lambda: boxloss.dense_crf_loss(args["probs"], args["image"], **kwargs))


@given(problems(), st.data())
def test_fuzz_filter_bad_values_raise(problem, data):
    probs, image, kwargs = problem
    argument = data.draw(st.sampled_from(["values", "image"]))
    args = {"values": probs, "image": image}
    args[argument] = corrupt(args[argument], data.draw(bad_values(FINITE)), data.draw(st.integers(0, 2**16)), 0)
    names = ("bilateral_filter", "permutohedral_lattice", "lattice_filter")
    assert_rejected(
        names,
        argument,
        lambda: boxloss.bilateral_filter(args["values"], args["image"], kwargs["sigma_xy"], kwargs["sigma_rgb"]),
    )


@settings(max_examples=_REFERENCE_EXAMPLES)
@given(problems())
def test_fuzz_double_backward_matches_lattice_reference(problem):
    # The loss is quadratic in probs: its Hessian-vector product (the backward op's own autograd formula) against
    # autograd through the plain-PyTorch lattice reference.
    probs, image, kwargs = problem
    v = torch.randn(probs.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kwargs = dict(kwargs, reduction="sum")
    (h,) = hessian_vector_product(lambda p: boxloss.dense_crf_loss(p, image, **kwargs), [probs], [v])
    (h_ref,) = hessian_vector_product(lambda p: dense_crf_loss_lattice_reference(p, image, **kwargs), [probs], [v])
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-12)
