"""boxloss.dense_crf_loss (CPU kernels) against its PyTorch lattice reference
(exactly) and the brute-force Gaussian loss (within the documented tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import boxloss
from boxloss.reference import dense_crf_loss_lattice_reference, dense_crf_loss_reference
from dense_crf_inputs import at_scale, natural_batch, random_inputs, relative_error, value_and_grad

OP = torch.ops.boxloss.dense_crf_loss.default
OP_BACKWARD = torch.ops.boxloss._dense_crf_loss_backward.default
LATTICE = torch.ops.boxloss.permutohedral_lattice.default


def test_compiled_ops_are_loaded():
    assert boxloss.extension_loaded(), boxloss.extension_error()


# ----------------------------------------------------------------- the op against its reference (exact)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1),
        (2, 2, 1, 9),
        (1, 3, 8, 1),
        (2, 4, 9, 11),
        (1, 21, 13, 12),
        (3, 2, 16, 16),
        (2, 21, 37, 41),
    ],  # the last: several 512-pixel tiles of the CPU filter
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("mask_fraction", [None, 0.3])
def test_matches_lattice_reference_float64(shape, mask_fraction):
    B, C, H, W = shape
    probs, image, mask = random_inputs(B, C, H, W, seed=B * 1000 + C * 100 + H, mask_fraction=mask_fraction)
    kwargs = dict(sigma_xy=3.0, sigma_rgb=20.0, valid_mask=mask, reduction="none")
    value, grad = value_and_grad(boxloss.dense_crf_loss, probs, image, **kwargs)
    ref_value, ref_grad = value_and_grad(dense_crf_loss_lattice_reference, probs, image, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scale_factor", [1.0, 0.5, 0.37])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_settings_match_lattice_reference(scale_factor, normalize, reduction):
    logits, image, valid = natural_batch(2, 24, 3, seed=3, with_mask=True)
    kwargs = dict(
        sigma_xy=12.0,
        sigma_rgb=15.0,
        valid_mask=valid,
        scale_factor=scale_factor,
        normalize=normalize,
        reduction=reduction,
    )
    value, grad = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, **kwargs)
    reference = at_scale(dense_crf_loss_lattice_reference)
    ref_value, ref_grad = value_and_grad(reference, logits.softmax(1), image, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scale_factor", [0.5, 0.37])
def test_resize_is_tangs(scale_factor):
    # Tang et al.'s DenseCRFLoss resizes the probabilities bilinearly
    # (align_corners=False) and the image and the mask by nearest neighbour.
    from boxloss.ops.dense_crf import _resize_like_tang

    logits, image, valid = natural_batch(2, 24, 3, seed=5, with_mask=True)
    probs = logits.softmax(1)
    p, im, m = _resize_like_tang(probs, image, valid, scale_factor)
    size = (int(24 * scale_factor),) * 2
    assert p.shape[2:] == im.shape[2:] == m.shape[1:] == size and m.dtype == torch.bool
    torch.testing.assert_close(p, F.interpolate(probs, scale_factor=scale_factor, mode="bilinear", align_corners=False))
    # Nearest neighbour: every output pixel is one input pixel, the same for the image and the mask.
    nearest = F.interpolate(torch.arange(24.0 * 24).view(1, 1, 24, 24), scale_factor=scale_factor, mode="nearest")
    index = nearest.long().flatten()
    torch.testing.assert_close(im, image.flatten(2)[:, :, index].view_as(im))
    assert torch.equal(m, valid.flatten(1)[:, index].view_as(m))


# ----------------------------------------------------------------- against the exact Gaussian (documented tolerance)


@pytest.mark.parametrize("sigma_xy, sigma_rgb", [(10.0, 15.0), (30.0, 15.0), (10.0, 40.0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_close_to_brute_force_on_natural_images(sigma_xy, sigma_rgb, with_mask):
    # docs/lattice.md, "Accuracy": within 2 % in value and 15 % (relative L2) in
    # gradient on natural images; the gradient through the softmax points the
    # same way (cosine > 0.99).
    logits, image, valid = natural_batch(1, 48, 4, seed=1, with_mask=with_mask)
    kwargs = dict(sigma_xy=sigma_xy, sigma_rgb=sigma_rgb, valid_mask=valid)
    x = logits.clone().requires_grad_()
    value = boxloss.dense_crf_loss(x.softmax(1), image, **kwargs)
    value.backward()
    y = logits.clone().requires_grad_()
    exact = dense_crf_loss_reference(y.softmax(1), image, **kwargs)
    exact.backward()
    assert abs(value.item() - exact.item()) <= 0.02 * exact.item()
    assert relative_error(x.grad, y.grad) < 0.15
    cosine = torch.nn.functional.cosine_similarity(x.grad.flatten(), y.grad.flatten(), dim=0)
    assert cosine > 0.99


def test_brute_force_reference_is_the_equation():
    # E = sum_k S_k^T W (1 - S_k), W_ij = exp(-|f_i - f_j|^2 / 2) for i != j, 0 on the diagonal; Z = 1^T W 1.
    probs, image, _ = random_inputs(1, 3, 4, 5, seed=9)
    f_xy = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")[::-1], -1).reshape(-1, 2)
    f = torch.cat([f_xy.double() / 2.0, image[0].reshape(3, -1).t() / 30.0], 1)
    W = torch.exp(-0.5 * torch.cdist(f, f) ** 2)
    W.fill_diagonal_(0)
    S = probs[0].reshape(3, -1)
    E = sum(S[k] @ W @ (1 - S[k]) for k in range(3))
    expected = E / W.sum()
    got = dense_crf_loss_reference(probs, image, sigma_xy=2.0, sigma_rgb=30.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        boxloss.dense_crf_loss(probs, image, sigma_xy=2.0, sigma_rgb=30.0, normalize=False),
        boxloss.dense_crf_loss(probs, image, sigma_xy=2.0, sigma_rgb=30.0)
        * boxloss.dense_crf_loss(
            torch.full_like(probs, 0.5)[:, :1], image, sigma_xy=2.0, sigma_rgb=30.0, normalize=False
        )
        * 4,
    )


# ----------------------------------------------------------------- properties


def test_values_are_non_negative_and_at_most_one():
    for seed in range(4):
        probs, image, mask = random_inputs(2, 5, 10, 9, seed=seed, mask_fraction=0.2)
        value = boxloss.dense_crf_loss(probs, image, sigma_xy=3.0, valid_mask=mask, reduction="none")
        assert torch.all(value >= 0) and torch.all(value <= 1)
        energy = boxloss.dense_crf_loss(probs, image, sigma_xy=3.0, valid_mask=mask, reduction="none", normalize=False)
        assert torch.all(energy >= 0)
    # Probabilities need not sum to one: each term S (1 - S) is still >= 0.
    sig = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.all(boxloss.dense_crf_loss(sig, image[:, :, :8, :8], reduction="none") >= 0)


def test_one_hot_constant_map_has_zero_loss():
    image = random_inputs(1, 1, 12, 12, seed=3)[1]
    probs = torch.zeros(1, 4, 12, 12, dtype=torch.float64)
    probs[:, 2] = 1
    assert boxloss.dense_crf_loss(probs, image).item() == 0.0


def test_invalid_pixels_enter_neither_as_i_nor_j():
    probs, image, _ = random_inputs(1, 3, 10, 10, seed=4)
    mask = torch.ones(1, 10, 10, dtype=torch.bool)
    mask[0, :, :5] = False
    base = boxloss.dense_crf_loss(probs, image, sigma_xy=3.0, valid_mask=mask, normalize=False)
    # Changing the probabilities of invalid pixels changes nothing ...
    other = probs.clone()
    other[..., :5] = other[..., :5].flip(1)
    torch.testing.assert_close(
        boxloss.dense_crf_loss(other, image, sigma_xy=3.0, valid_mask=mask, normalize=False), base
    )
    # ... and their gradient is 0.
    _, grad = value_and_grad(boxloss.dense_crf_loss, probs, image, sigma_xy=3.0, valid_mask=mask)
    assert torch.all(grad[..., :5] == 0) and torch.any(grad[..., 5:] != 0)


def test_image_without_valid_pairs_contributes_zero():
    probs, image, _ = random_inputs(3, 2, 6, 6, seed=5)
    mask = torch.ones(3, 6, 6, dtype=torch.bool)
    mask[1] = False
    mask[2] = False
    mask[2, 3, 3] = True  # a single valid pixel has no pair
    value, grad = value_and_grad(boxloss.dense_crf_loss, probs, image, valid_mask=mask, reduction="none")
    assert value[1].item() == 0.0 and value[0].item() > 0
    assert torch.all(grad[1] == 0)
    assert value[2].item() == 0.0 and torch.all(grad[2] == 0)  # one valid pixel: no pair
    energy, grad = value_and_grad(
        boxloss.dense_crf_loss, probs, image, valid_mask=mask, reduction="none", normalize=False
    )
    assert energy[1].item() == 0.0 and energy[2].item() == 0.0 and torch.all(grad[1:] == 0)
    mean = boxloss.dense_crf_loss(probs, image, valid_mask=mask)
    torch.testing.assert_close(mean, value.sum() / 3)


def test_gradient_is_w1_minus_2ws_and_tangs_through_softmax():
    # dE/dS_k = W 1 - 2 W S_k; W 1 is the same for every class, so through a
    # softmax the gradient equals that of Tang's -sum_k S_k^T W S_k.
    logits, image, _ = natural_batch(1, 20, 3, seed=6)
    kwargs = dict(sigma_xy=6.0, sigma_rgb=15.0, normalize=False)
    x = logits.clone().requires_grad_()
    boxloss.dense_crf_loss(x.softmax(1), image, **kwargs).backward()
    from boxloss.reference.bilateral import (
        lattice_filter_reference,
        permutohedral_lattice_reference,
        self_affinity_lower_bound,
    )

    lattice = permutohedral_lattice_reference(image, 6.0, 15.0)
    splat_weight = lattice[1]
    c = self_affinity_lower_bound(splat_weight).reshape(1, 1, 20, 20)

    def w(v):
        return 0.5 * (lattice_filter_reference(v, lattice) + lattice_filter_reference(v, lattice, reverse=True)) - c * v

    y = logits.clone().requires_grad_()
    S = y.softmax(1)
    tang = -(S * w(S)).sum()
    tang.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    probs, image, mask = random_inputs(2, 3, 5, 6, seed=7, mask_fraction=0.2)
    probs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: boxloss.dense_crf_loss(
            p, image, sigma_xy=2.0, sigma_rgb=30.0, valid_mask=mask, normalize=normalize, reduction="none"
        ),
        (probs,),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


def test_gradcheck_through_resizing():
    probs, image, mask = random_inputs(1, 2, 8, 10, seed=8, mask_fraction=0.1)
    probs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: boxloss.dense_crf_loss(p, image, sigma_xy=6.0, scale_factor=0.5, valid_mask=mask), (probs,)
    )


def test_image_gets_no_gradient():
    probs, image, _ = random_inputs(1, 2, 5, 5, seed=9)
    probs.requires_grad_()
    image.requires_grad_()
    boxloss.dense_crf_loss(probs, image).backward()
    assert image.grad is None and probs.grad is not None


# ----------------------------------------------------------------- opcheck, compile, module


def _op_args(mask_fraction=None, seed=10):
    probs, image, mask = random_inputs(2, 3, 5, 6, seed=seed, mask_fraction=mask_fraction)
    return probs, mask, *LATTICE(image, 3.0, 20.0)


@pytest.mark.parametrize("mask_fraction", [None, 0.3])
def test_opcheck_forward(mask_fraction):
    probs, mask, *lattice = _op_args(mask_fraction)
    torch.library.opcheck(OP, (probs.requires_grad_(), mask, *lattice))


@pytest.mark.parametrize("mask_fraction", [None, 0.3])
def test_opcheck_backward(mask_fraction):
    probs, mask, *lattice = _op_args(mask_fraction, seed=11)
    grad = torch.rand(2, dtype=torch.float64)
    # With inputs that require grad, opcheck also checks the backward op's own autograd formula.
    torch.library.opcheck(OP_BACKWARD, (grad.requires_grad_(), probs.requires_grad_(), mask, *lattice))


def test_backward_keeps_only_the_inputs_and_the_lattice():
    # The backward filters the probabilities again: nothing of the size of the (C + 1)-channel filtered values is
    # saved between the forward and the backward (it would be held across a whole network's forward).
    probs, image, mask = random_inputs(2, 5, 12, 13, seed=4, mask_fraction=0.2, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = probs.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = boxloss.dense_crf_loss(x, image, sigma_xy=4.0, valid_mask=mask)
    lattice = LATTICE(image, 4.0, 15.0)
    allowed = x.numel() * 4 + mask.numel() + sum(t.numel() * t.element_size() for t in lattice) + 256
    assert sum(t.numel() * t.element_size() for t in saved) <= allowed
    assert not any(t.dim() == 4 and t.shape[1] == probs.shape[1] + 1 for t in saved)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_torch_compile_fullgraph_matches_eager():
    logits, image, valid = natural_batch(2, 16, 3, seed=12, dtype=torch.float32, with_mask=True)

    def step(x, im, m):
        return boxloss.dense_crf_loss(x.softmax(1), im, sigma_xy=8.0, valid_mask=m, scale_factor=0.5) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager = step(x_eager, image, valid)
    result = compiled(x_compiled, image, valid)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_module_matches_function_and_repr():
    logits, image, valid = natural_batch(2, 16, 3, seed=13, with_mask=True)
    module = boxloss.DenseCRFLoss(sigma_rgb=20.0, sigma_xy=40.0, scale_factor=0.5, reduction="sum")
    expected = boxloss.dense_crf_loss(
        logits.softmax(1), image, sigma_rgb=20.0, sigma_xy=40.0, scale_factor=0.5, reduction="sum", valid_mask=valid
    )
    torch.testing.assert_close(module(logits.softmax(1), image, valid), expected)
    assert "scale_factor=0.5" in repr(module) and "sigma_xy=40.0" in repr(module)


def test_docstring_example_runs():
    logits = torch.randn(2, 21, 32, 32, requires_grad=True)
    image = torch.rand(2, 3, 32, 32) * 255
    loss = boxloss.dense_crf_loss(logits.softmax(1), image, scale_factor=0.5)
    loss.backward()
    assert 0 <= loss.item() <= 1 and torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------- dtypes, layouts, threads


def test_float32_close_to_float64():
    logits, image, valid = natural_batch(2, 32, 5, seed=14, with_mask=True)
    kwargs = dict(sigma_xy=10.0, valid_mask=valid, reduction="none")
    exact, exact_grad = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, **kwargs)
    single, single_grad = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1).float(), image.float(), **kwargs)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-7)
    assert relative_error(single_grad.double(), exact_grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_in_float32(dtype):
    logits, image, _ = natural_batch(1, 24, 4, seed=15, dtype=torch.float32)
    probs = logits.softmax(1).to(dtype)
    value, grad = value_and_grad(boxloss.dense_crf_loss, probs, image, sigma_xy=8.0)
    exact, exact_grad = value_and_grad(boxloss.dense_crf_loss, probs.float(), image, sigma_xy=8.0)
    assert value.dtype == dtype and grad.dtype == dtype
    assert abs(value.float().item() - exact.item()) <= 2 * torch.finfo(dtype).eps * exact.item()
    assert relative_error(grad.float(), exact_grad) <= 2 * torch.finfo(dtype).eps


def test_non_contiguous_inputs():
    logits, image, valid = natural_batch(2, 20, 4, seed=16, with_mask=True)
    probs = logits.softmax(1)
    expected = value_and_grad(boxloss.dense_crf_loss, probs, image, valid_mask=valid, sigma_xy=6.0)
    got = value_and_grad(
        boxloss.dense_crf_loss,
        probs.to(memory_format=torch.channels_last),
        image.to(memory_format=torch.channels_last),
        valid_mask=valid.transpose(1, 2).contiguous().transpose(1, 2),
        sigma_xy=6.0,
    )
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_deterministic_and_thread_independent():
    logits, image, valid = natural_batch(3, 40, 6, seed=17, dtype=torch.float32, with_mask=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, valid_mask=valid, reduction="none")
        one_single = value_and_grad(boxloss.dense_crf_loss, logits[:1].softmax(1), image[:1], valid_mask=valid[:1])
        torch.set_num_threads(max(2, threads))
        many = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, valid_mask=valid, reduction="none")
        one_many = value_and_grad(boxloss.dense_crf_loss, logits[:1].softmax(1), image[:1], valid_mask=valid[:1])
    finally:
        torch.set_num_threads(threads)
    again = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, valid_mask=valid, reduction="none")
    for a, b in [(single, many), (single, again), (one_single, one_many)]:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------- bad input


def _good():
    probs, image, mask = random_inputs(2, 3, 6, 7, seed=18, mask_fraction=0.2, dtype=torch.float32)
    return dict(probs=probs, image=image, valid_mask=mask)


BAD_INPUTS = {
    "probs not a tensor": (lambda g: dict(g, probs=[[0.5]]), TypeError, "probs"),
    "probs 3-D": (lambda g: dict(g, probs=g["probs"][0]), ValueError, "probs must have shape"),
    "probs int": (lambda g: dict(g, probs=(g["probs"] > 0.5).long()), TypeError, "probs must be float"),
    "probs empty": (lambda g: dict(g, probs=g["probs"][:, :0]), ValueError, "non-empty"),
    "image 1 channel": (lambda g: dict(g, image=g["image"][:, :1]), ValueError, "3 \\(RGB\\) channels"),
    "image 4 channels": (
        lambda g: dict(g, image=torch.cat([g["image"], g["image"][:, :1]], 1)),
        ValueError,
        "3 \\(RGB\\) channels",
    ),
    "image mismatch": (lambda g: dict(g, image=g["image"][..., :5]), ValueError, "image must match probs"),
    "image nan": (
        lambda g: dict(g, image=torch.where(g["image"] > 250, float("nan"), g["image"])),
        ValueError,
        "image must be finite",
    ),
    "image inf": (
        lambda g: dict(g, image=torch.where(g["image"] > 250, float("inf"), g["image"])),
        ValueError,
        "image must be finite",
    ),
    "probs nan": (
        lambda g: dict(g, probs=torch.where(g["probs"] > 0.8, float("nan"), g["probs"])),
        ValueError,
        "probs must hold probabilities in \\[0, 1\\], but it contains NaN",
    ),
    "probs inf": (
        lambda g: dict(g, probs=torch.where(g["probs"] > 0.8, float("inf"), g["probs"])),
        ValueError,
        "contains Inf",
    ),
    "logits": (lambda g: dict(g, probs=g["probs"] * 8 - 4), ValueError, "not logits"),
    "sigma_rgb zero": (lambda g: dict(g, sigma_rgb=0.0), ValueError, "sigma_rgb must be a positive finite"),
    "sigma_xy negative": (lambda g: dict(g, sigma_xy=-80.0), ValueError, "sigma_xy must be a positive finite"),
    "sigma_xy nan": (lambda g: dict(g, sigma_xy=float("nan")), ValueError, "sigma_xy"),
    "sigma_rgb bool": (lambda g: dict(g, sigma_rgb=True), TypeError, "sigma_rgb must be a number"),
    "scale zero": (lambda g: dict(g, scale_factor=0.0), ValueError, "scale_factor must be a positive finite"),
    "scale too small": (lambda g: dict(g, scale_factor=0.1), ValueError, "leaves no pixel"),
    "mask not bool": (lambda g: dict(g, valid_mask=g["valid_mask"].float()), TypeError, "valid_mask must be a bool"),
    "mask shape": (lambda g: dict(g, valid_mask=g["valid_mask"][:, :4]), ValueError, "valid_mask must have shape"),
    "reduction": (lambda g: dict(g, reduction="avg"), ValueError, "reduction must be one of"),
    "normalize not bool": (lambda g: dict(g, normalize=1), TypeError, "normalize must be a bool"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    build, error, message = BAD_INPUTS[case]
    kwargs = build(_good())
    probs, image = kwargs.pop("probs"), kwargs.pop("image")
    with pytest.raises(error, match=message):
        boxloss.dense_crf_loss(probs, image, **kwargs)


def test_nan_probs_at_invalid_pixels_still_raise():
    # As the Sparse-CRF loss: every probability must be valid, masked or not.
    g = _good()
    probs = g["probs"].clone()
    mask = torch.ones(2, 6, 7, dtype=torch.bool)
    mask[:, 0, 0] = False
    probs[:, :, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        boxloss.dense_crf_loss(probs, g["image"], valid_mask=mask)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda p, m, lat: (p[0], m, *lat), ValueError, "probs must have shape"),
        (lambda p, m, lat: (p[:1], m, *lat), ValueError, "splat_index must have shape"),
        (lambda p, m, lat: (p.double(), m, *lat), TypeError, "splat_weight must be"),
        (lambda p, m, lat: (p, m[:, 1:], *lat), ValueError, "valid_mask must have shape"),
        (lambda p, m, lat: (p, m.int(), *lat), TypeError, "valid_mask must be a bool"),
        (lambda p, m, lat: (p, m, lat[0].clone().fill_(999), *lat[1:]), ValueError, "outside its image's range"),
        (lambda p, m, lat: (p * 3, m, *lat), ValueError, "probs must hold probabilities"),
    ],
)
def test_raw_op_rejects_bad_input_without_crashing(args, error, message):
    g = _good()
    lattice = LATTICE(g["image"], 3.0, 15.0)
    with pytest.raises(error, match=message):
        OP(*args(g["probs"], g["valid_mask"], lattice))


def test_raw_backward_rejects_bad_shapes():
    g = _good()
    lattice = LATTICE(g["image"], 3.0, 15.0)
    with pytest.raises(ValueError, match="grad_energy must have shape"):
        OP_BACKWARD(torch.ones(3), g["probs"], g["valid_mask"], *lattice)
    with pytest.raises(ValueError, match="probs must have shape"):
        OP_BACKWARD(torch.ones(2), g["probs"][0], g["valid_mask"], *lattice)


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="DenseCRFLoss: sigma_xy"):
        boxloss.DenseCRFLoss(sigma_xy=0)
    with pytest.raises(ValueError, match="DenseCRFLoss: reduction"):
        boxloss.DenseCRFLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="DenseCRFLoss: normalize"):
        boxloss.DenseCRFLoss(normalize="yes")


# ----------------------------------------------------------------- fallback path


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))


def test_fallback_to_reference_matches():
    code = (
        "import warnings, torch, boxloss\n"
        "from boxloss.reference import dense_crf_loss_lattice_reference as ref\n"
        "from boxloss.reference import lattice_filter_reference, permutohedral_lattice_reference\n"
        "assert not boxloss.extension_loaded()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "p = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64).softmax(1)\n"
        "im = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64) * 255\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    a = boxloss.dense_crf_loss(p, im, sigma_xy=3.0)\n"
        "    f = boxloss.bilateral_filter(p, im, 3.0, 15.0)\n"
        "torch.testing.assert_close(a, ref(p, im, sigma_xy=3.0))\n"
        "torch.testing.assert_close(f, lattice_filter_reference(p, permutohedral_lattice_reference(im, 3.0, 15.0)))\n"
        "for bad in (p * 5, p.masked_fill(p > 0.9, float('nan'))):\n"
        "    try:\n"
        "        boxloss.dense_crf_loss(bad, im)\n"
        "    except ValueError as e:\n"
        "        assert 'probs' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('fallback accepted bad probs')\n"
        "print('ok')\n"
    )
    result = _run_python(code, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_cuda_kernels_are_registered_when_built_with_cuda():
    from boxloss import _build_info

    for op in ("permutohedral_lattice", "lattice_filter", "dense_crf_loss", "_dense_crf_loss_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"boxloss::{op}", "CUDA") == bool(_build_info.WITH_CUDA)
