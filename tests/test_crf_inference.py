"""boxloss.dense_crf_inference (CPU kernel) against the PyTorch reference written from the paper (on the
same lattices, float64, to rounding), against Krähenbühl's code through pydensecrf (where it is installed),
and against the exact Gaussians; masks, impossible labels, dtypes, layouts, threads, opcheck, compile,
every bad input and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import boxloss
from boxloss.reference.bilateral import lattice_filter_reference, permutohedral_lattice_reference, pixel_features
from boxloss.reference.crf_inference import (
    dense_crf_inference_reference,
    gaussian_filter_brute_force,
    lattice_filter_nd,
    permutohedral_lattice_nd,
    spatial_features,
)
from dense_crf_inputs import natural_batch, natural_image, pydensecrf_inference_or_skip, relative_error

OP = torch.ops.boxloss.dense_crf_inference.default
BANA = dict(bilateral=(4.0, 55.0, 3.0), gaussian=(3.0, 3.0), iterations=10)


def test_compiled_ops_are_loaded():
    assert boxloss.extension_loaded(), boxloss.extension_error()


def _unaries(B, C, size, seed, dtype=torch.float64, with_mask=False):
    """(unary = -log softmax of smooth logits that follow the image's objects, image, valid)."""
    logits, image, valid = natural_batch(B, size, C, seed=seed, dtype=dtype, with_mask=with_mask)
    return -logits.log_softmax(1), image, valid


def _random_unaries(B, C, H, W, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 4).to(dtype)
    image = (torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255).to(dtype)
    return unary, image


# ----------------------------------------------------------------- the reference itself


def test_reference_lattice_in_d_dimensions_is_the_5d_lattice():
    image = natural_image(20, seed=1)
    lattice = permutohedral_lattice_nd(pixel_features(image, 5.0, 10.0)[0])
    expected = permutohedral_lattice_reference(image, 5.0, 10.0)
    splat_index, _, blur_neighbours, _ = expected
    assert torch.equal(lattice.splat_index.int(), splat_index[0])
    assert torch.equal(lattice.blur_neighbours.int(), blur_neighbours)
    values = torch.rand(3, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        lattice_filter_nd(values, lattice),
        lattice_filter_reference(values.reshape(1, 3, 20, 20), expected)[0].reshape(3, 400),
        rtol=0,
        atol=0,
    )


def test_spatial_lattice_approximates_the_gaussian():
    # The 2-d lattice of the smoothness kernel, normalised as inference uses it, is within 1 % of
    # the exact Gaussian; its raw output is a near-constant fraction of the exact sum.
    feats = spatial_features(30, 30, 3.0)
    lattice = permutohedral_lattice_nd(feats)
    x = torch.cat(
        [
            torch.rand(2, 900, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
            torch.ones(1, 900, dtype=torch.float64),
        ]
    )
    approx = lattice_filter_nd(x, lattice)
    exact = gaussian_filter_brute_force(x, feats)
    assert 0.8 < float((approx * exact).sum() / (exact * exact).sum()) < 0.95
    assert relative_error(approx[:2] / approx[2:], exact[:2] / exact[2:]) < 0.01


def test_reference_with_one_kernel_of_weight_zero_is_a_plain_softmax():
    unary, image = _random_unaries(1, 4, 6, 7, seed=2)
    q = dense_crf_inference_reference(unary, image, bilateral=(0.0, 5.0, 5.0), gaussian=(0.0, 3.0))
    torch.testing.assert_close(q, torch.softmax(-unary, 1), rtol=0, atol=0)


# ----------------------------------------------------------------- against the reference, float64


@pytest.mark.parametrize(
    "B, C, H, W",
    [
        (1, 1, 1, 1),
        (1, 2, 1, 1),
        (2, 3, 1, 9),
        (1, 4, 7, 1),
        (3, 5, 6, 7),
        (1, 9, 11, 13),
        (2, 21, 13, 12),
        (1, 40, 9, 8),
        (1, 3, 37, 41),
    ],
)
def test_matches_reference_float64(B, C, H, W):
    unary, image = _random_unaries(B, C, H, W, seed=B * 100 + C * 10 + H)
    kwargs = dict(bilateral=(4.0, 3.0, 20.0), gaussian=(3.0, 1.5), iterations=4)
    q = boxloss.dense_crf_inference(unary, image, **kwargs)
    ref = dense_crf_inference_reference(unary, image, **kwargs)
    assert q.dtype == torch.float64 and q.shape == unary.shape and q.is_contiguous()
    assert relative_error(q, ref) < 1e-6
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "settings",
    [
        BANA,
        dict(bilateral=(5.0, 80.0, 13.0), gaussian=(3.0, 3.0), iterations=5),
        dict(bilateral=(10.0, 20.0, 10.0), gaussian=(1.0, 1.0), iterations=3),
        dict(bilateral=(4.0, 55.0, 3.0), gaussian=(0.0, 3.0), iterations=2),
        dict(bilateral=(0.0, 55.0, 3.0), gaussian=(3.0, 3.0), iterations=2),
        dict(bilateral=(0.0, 55.0, 3.0), gaussian=(0.0, 3.0), iterations=1),
        dict(bilateral=(1e3, 10.0, 10.0), gaussian=(1e3, 0.5), iterations=2),
    ],
)
def test_settings_match_reference_on_natural_images(settings):
    unary, image, valid = _unaries(2, 6, 40, seed=3, with_mask=True)
    for mask in (None, valid):
        q = boxloss.dense_crf_inference(unary, image, valid_mask=mask, **settings)
        ref = dense_crf_inference_reference(unary, image, valid_mask=mask, **settings)
        torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-9)


def test_float32_close_to_float64():
    unary, image, _ = _unaries(2, 21, 48, seed=4)
    q64 = boxloss.dense_crf_inference(unary, image, **BANA)
    q32 = boxloss.dense_crf_inference(unary.float(), image.float(), **BANA)
    assert q32.dtype == torch.float32
    assert float((q32.double() - q64).abs().max()) < 1e-4
    assert relative_error(q32.double(), q64) < 1e-5


def test_outputs_are_distributions_and_iterations_converge():
    unary, image, _ = _unaries(1, 5, 48, seed=5)
    q = {t: boxloss.dense_crf_inference(unary, image, **dict(BANA, iterations=t)) for t in (1, 10, 30, 31)}
    for v in q.values():
        assert v.min() >= 0 and torch.allclose(v.sum(1), torch.ones_like(v[:, 0]))
    # Mean field settles: the last steps change little, the first a lot.
    assert float((q[31] - q[30]).abs().max()) < float((q[10] - q[1]).abs().max())


def test_smoothing_cleans_up_noisy_unaries():
    # Noisy unaries around a clean segmentation: the CRF's labels agree with the truth more than the
    # unaries' own argmax (what the CRF is for).
    torch.manual_seed(6)
    truth = torch.zeros(64, 64, dtype=torch.long)
    truth[16:48, 20:52] = 1
    image = torch.where(truth.bool(), 200.0, 40.0).expand(1, 3, 64, 64).double().contiguous()
    probs = torch.nn.functional.one_hot(truth, 2).permute(2, 0, 1)[None].double() * 0.2 + 0.4
    probs = probs + 0.4 * torch.rand_like(probs)
    unary = -(probs / probs.sum(1, keepdim=True)).log()
    q = boxloss.dense_crf_inference(unary, image, **BANA)
    before = float((unary.argmin(1)[0] == truth).float().mean())
    after = float((q.argmax(1)[0] == truth).float().mean())
    assert before < 0.9 and after > 0.99


# ----------------------------------------------------------------- against Krähenbühl's code (pydensecrf)


@pytest.mark.parametrize("size, C, seed", [(96, 21, 0), (96, 21, 3), (128, 5, 1), (160, 3, 2)])
@pytest.mark.parametrize(
    "settings",
    [
        BANA,
        dict(bilateral=(5.0, 80.0, 13.0), gaussian=(3.0, 3.0), iterations=10),
        dict(bilateral=(10.0, 20.0, 10.0), gaussian=(1.0, 1.0), iterations=5),
    ],
    ids=["bana", "wide", "narrow"],
)
def test_agrees_with_pydensecrf(size, C, seed, settings):
    # The same lattices (to float rounding), normalisation and update as Krähenbühl's DenseCRF2D
    # (docs/crf_inference.md): per-pixel argmax agreement >= 99.9 % and |Q - Q_pydensecrf| <= 1e-3
    # (measured: 100 % and at most 1.1e-4 at BANA's settings, mean under 1e-7).
    unary, image, _ = _unaries(1, C, size, seed, dtype=torch.float32)
    image8 = image.round().clamp(0, 255).to(torch.uint8)
    expected = pydensecrf_inference_or_skip(unary, image8, **settings)
    q = boxloss.dense_crf_inference(unary, image8, **settings)
    agreement = float((q.argmax(1) == expected.argmax(1)).float().mean())
    assert agreement >= 0.999
    assert float((q - expected).abs().max()) <= 1e-3
    assert float((q - expected).abs().mean()) <= 1e-6


def test_agrees_with_pydensecrf_on_impossible_labels():
    unary, image, _ = _unaries(1, 4, 64, seed=7, dtype=torch.float32)
    unary[:, 2] = float("inf")  # a class absent from the image
    unary[:, 1, :20] = float("inf")  # a class impossible in the top rows
    image8 = image.round().clamp(0, 255).to(torch.uint8)
    expected = pydensecrf_inference_or_skip(unary, image8, **BANA)
    q = boxloss.dense_crf_inference(unary, image8, **BANA)
    assert torch.all(q[:, 2] == 0) and torch.all(q[:, 1, :20] == 0)
    assert torch.all(expected[:, 2] == 0)
    assert float((q - expected).abs().max()) <= 1e-3


# ----------------------------------------------------------------- the exact Gaussians


def test_lattice_inference_close_to_exact_kernels():
    # Inference with the exact Gaussians (brute force) instead of the lattices: the lattices are
    # Krähenbühl's approximation, so the marginals differ, but little (docs: the labels of >= 98 %
    # of the pixels; the measured agreement here is higher).
    unary, image, _ = _unaries(1, 4, 40, seed=8)
    settings = dict(bilateral=(4.0, 10.0, 15.0), gaussian=(3.0, 3.0), iterations=5)
    q = boxloss.dense_crf_inference(unary, image, **settings)
    exact = dense_crf_inference_reference(unary, image, kernels="exact", **settings)
    assert float((q.argmax(1) == exact.argmax(1)).float().mean()) >= 0.98
    assert float((q - exact).abs().mean()) < 0.02


# ----------------------------------------------------------------- masks and impossible labels


def test_invalid_pixels_keep_softmax_and_neither_send_nor_receive():
    unary, image, valid = _unaries(2, 5, 32, seed=9, with_mask=True)
    valid[:, :8] = False
    q = boxloss.dense_crf_inference(unary, image, valid_mask=valid, **BANA)
    q0 = torch.softmax(-unary, 1)
    invalid = ~valid[:, None].expand_as(q)
    torch.testing.assert_close(q[invalid], q0[invalid], rtol=1e-14, atol=1e-15)
    # Whatever the invalid pixels' unaries, the valid pixels' Q is the same.
    other = torch.where(valid[:, None], unary, torch.rand_like(unary) * 50)
    q_other = boxloss.dense_crf_inference(other, image, valid_mask=valid, **BANA)
    torch.testing.assert_close(q_other[~invalid], q[~invalid], rtol=1e-12, atol=1e-14)
    # A mask of all-valid pixels is no mask.
    torch.testing.assert_close(
        boxloss.dense_crf_inference(unary, image, valid_mask=torch.ones_like(valid), **BANA),
        boxloss.dense_crf_inference(unary, image, **BANA),
        rtol=0,
        atol=0,
    )


def test_all_invalid_and_single_valid_pixel():
    unary, image, valid = _unaries(1, 3, 16, seed=10, with_mask=True)
    none = torch.zeros_like(valid)
    q = boxloss.dense_crf_inference(unary, image, valid_mask=none, **BANA)
    torch.testing.assert_close(q, torch.softmax(-unary, 1), rtol=1e-14, atol=1e-15)
    one = none.clone()
    one[0, 5, 7] = True
    q = boxloss.dense_crf_inference(unary, image, valid_mask=one, **BANA)
    ref = dense_crf_inference_reference(unary, image, valid_mask=one, **BANA)
    torch.testing.assert_close(q, ref, rtol=1e-9, atol=1e-12)


def test_infinite_unaries_give_probability_exactly_zero():
    unary, image, _ = _unaries(2, 5, 24, seed=11)
    unary[0, 1] = float("inf")
    unary[1, :4, 3:9, 2:20] = float("inf")  # only class 4 possible there
    q = boxloss.dense_crf_inference(unary, image, **BANA)
    assert torch.all(q[0, 1] == 0)
    assert torch.all(q[1, :4, 3:9, 2:20] == 0) and torch.all(q[1, 4, 3:9, 2:20] == 1)
    ref = dense_crf_inference_reference(unary, image, **BANA)
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-12)


def test_huge_finite_unaries():
    unary, image, _ = _unaries(1, 3, 16, seed=12, dtype=torch.float32)
    unary[:, 0] = 1e30
    unary[:, 1] = -1e30  # a "probability" of e^1e30: still a valid (if odd) unary
    q = boxloss.dense_crf_inference(unary, image, **BANA)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q[:, 1], torch.ones_like(q[:, 1]))


# ----------------------------------------------------------------- dtypes, layouts, threads, batches


def test_uint8_and_float_images_agree():
    unary, image, _ = _unaries(2, 4, 24, seed=13, dtype=torch.float32)
    image8 = image.round().clamp(0, 255).to(torch.uint8)
    a = boxloss.dense_crf_inference(unary, image8, **BANA)
    for im in (image8.float(), image8.double(), image8.half()):
        torch.testing.assert_close(boxloss.dense_crf_inference(unary, im, **BANA), a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_unaries_run_in_float32(dtype):
    unary, image, _ = _unaries(1, 5, 24, seed=14, dtype=torch.float32)
    q = boxloss.dense_crf_inference(unary.to(dtype), image, **BANA)
    expected = boxloss.dense_crf_inference(unary.to(dtype).float(), image, **BANA)
    assert q.dtype == dtype
    torch.testing.assert_close(q, expected.to(dtype), rtol=0, atol=0)


def test_non_contiguous_inputs():
    unary, image, valid = _unaries(2, 4, 20, seed=15, with_mask=True)
    expected = boxloss.dense_crf_inference(unary, image, valid_mask=valid, **BANA)
    got = boxloss.dense_crf_inference(
        unary.contiguous(memory_format=torch.channels_last),
        image.transpose(2, 3).contiguous().transpose(2, 3),
        valid_mask=valid.transpose(1, 2).contiguous().transpose(1, 2),
        **BANA,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    wide = torch.cat([unary, unary], 1)[:, ::2]
    torch.testing.assert_close(
        boxloss.dense_crf_inference(wide, image, **BANA),
        boxloss.dense_crf_inference(wide.contiguous(), image, **BANA),
        rtol=0,
        atol=0,
    )


def test_deterministic_thread_and_batch_independent():
    # One image on several threads runs the splat split by channel blocks (21 classes: two blocks),
    # three images run one per thread: every result is the same bit for bit.
    unary, image, valid = _unaries(3, 21, 40, seed=16, dtype=torch.float32, with_mask=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            batch = boxloss.dense_crf_inference(unary, image, valid_mask=valid, **BANA)
            single = torch.cat(
                [
                    boxloss.dense_crf_inference(unary[b : b + 1], image[b : b + 1], valid_mask=valid[b : b + 1], **BANA)
                    for b in range(3)
                ]
            )
            results += [batch, single]
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_large_image_on_several_threads_is_bit_identical():
    # From 2^16 pixels one image runs on every thread: pixel passes and blurs split by ranges, the
    # splat by 64-byte channel blocks (21 classes: two blocks).
    unary, image, _ = _unaries(1, 21, 257, seed=23, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = boxloss.dense_crf_inference(unary, image, **dict(BANA, iterations=3))
        torch.set_num_threads(max(2, threads))
        many = boxloss.dense_crf_inference(unary, image, **dict(BANA, iterations=3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, many)


def test_empty_batch():
    unary = torch.zeros(0, 3, 5, 6)
    q = boxloss.dense_crf_inference(unary, torch.zeros(0, 3, 5, 6))
    assert q.shape == (0, 3, 5, 6)


# ----------------------------------------------------------------- opcheck, compile, module, autograd


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(with_mask):
    unary, image, valid = _unaries(2, 3, 9, seed=17, dtype=torch.float32, with_mask=True)
    torch.library.opcheck(OP, (unary, image, valid if with_mask else None, 4.0, 5.0, 10.0, 3.0, 2.0, 3))


def test_torch_compile_fullgraph_matches_eager():
    unary, image, valid = _unaries(2, 4, 20, seed=18, dtype=torch.float32, with_mask=True)

    def labels(u, im, m):
        return boxloss.dense_crf_inference(u * 1.0, im, valid_mask=m, **BANA).argmax(1)

    compiled = torch.compile(labels, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(unary, image, valid), labels(unary, image, valid))


def test_module_matches_function_and_repr():
    unary, image, valid = _unaries(1, 3, 16, seed=19, with_mask=True)
    crf = boxloss.DenseCRF(bilateral=(5, 50, 5), gaussian=(3, 1), iterations=4)
    expected = boxloss.dense_crf_inference(
        unary, image, bilateral=(5.0, 50.0, 5.0), gaussian=(3.0, 1.0), iterations=4, valid_mask=valid
    )
    torch.testing.assert_close(crf(unary, image, valid), expected, rtol=0, atol=0)
    assert "bilateral=(5.0, 50.0, 5.0)" in repr(crf) and "iterations=4" in repr(crf)


def test_docstring_example_runs():
    probs = torch.rand(1, 21, 64, 64).softmax(1)
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    q = boxloss.dense_crf_inference(-probs.log(), image)
    assert q.argmax(1).shape == (1, 64, 64)


def test_unary_that_requires_grad_raises_unless_grad_is_off():
    unary, image, _ = _unaries(1, 3, 8, seed=20, dtype=torch.float32)
    unary.requires_grad_()
    with pytest.raises(ValueError, match="dense_crf_inference: unary requires grad.*detach"):
        boxloss.dense_crf_inference(unary, image)
    with torch.no_grad():
        q = boxloss.dense_crf_inference(unary, image)
    torch.testing.assert_close(q, boxloss.dense_crf_inference(unary.detach(), image), rtol=0, atol=0)


def test_raw_op_has_no_backward():
    unary, image, _ = _unaries(1, 3, 8, seed=21, dtype=torch.float32)
    unary.requires_grad_()
    q = OP(unary, image, None, 4.0, 5.0, 10.0, 3.0, 2.0, 2)
    with pytest.raises(RuntimeError, match="not differentiable"):
        q.sum().backward()


# ----------------------------------------------------------------- bad input


def _good():
    unary, image, valid = _unaries(2, 3, 6, seed=22, dtype=torch.float32, with_mask=True)
    return dict(unary=unary, image=image, valid_mask=valid)


def _with(tensor, index, value):
    out = tensor.clone()
    out[index] = value
    return out


BAD_INPUTS = {
    "unary not a tensor": (lambda g: dict(g, unary=[[1.0]]), TypeError, "unary must be a torch.Tensor"),
    "unary 3-D": (lambda g: dict(g, unary=g["unary"][0]), ValueError, "unary must have shape"),
    "unary int": (lambda g: dict(g, unary=g["unary"].long()), TypeError, "unary must be float"),
    "unary no class": (lambda g: dict(g, unary=g["unary"][:, :0]), ValueError, "at least one class"),
    "unary no pixel": (
        lambda g: dict(g, unary=g["unary"][..., :0], image=g["image"][..., :0], valid_mask=g["valid_mask"][..., :0]),
        ValueError,
        "one pixel",
    ),
    "unary nan": (
        lambda g: dict(g, unary=_with(g["unary"], (1, 0, 2, 3), float("nan"))),
        ValueError,
        "unary must not contain NaN, but batch element\\(s\\) \\[1\\] do \\(first at batch element 1, y = 2, x = 3\\)",
    ),
    "unary -inf": (
        lambda g: dict(g, unary=_with(g["unary"], (0, 2, 0, 1), float("-inf"))),
        ValueError,
        "must not be -Inf .* \\[0\\] contain -Inf \\(first at batch element 0, y = 0, x = 1\\)",
    ),
    "unary all +inf": (
        lambda g: dict(g, unary=_with(g["unary"], (1, slice(None), 4, 5), float("inf"))),
        ValueError,
        "\\+Inf for every class at some pixel .* \\[1\\] \\(first at batch element 1, y = 4, x = 5\\)",
    ),
    "nan at invalid pixel": (
        lambda g: dict(
            g, unary=_with(g["unary"], (0, 0, 0, 0), float("nan")), valid_mask=_with(g["valid_mask"], (0, 0, 0), False)
        ),
        ValueError,
        "NaN",
    ),
    "image not a tensor": (lambda g: dict(g, image=1.0), TypeError, "image must be a torch.Tensor"),
    "image 1 channel": (lambda g: dict(g, image=g["image"][:, :1]), ValueError, "image must have 3 \\(RGB\\)"),
    "image 4 channels": (
        lambda g: dict(g, image=torch.cat([g["image"], g["image"][:, :1]], 1)),
        ValueError,
        "image must have 3 \\(RGB\\)",
    ),
    "image size": (lambda g: dict(g, image=g["image"][..., :5]), ValueError, "image must match unary in B, H and W"),
    "image batch": (lambda g: dict(g, image=g["image"][:1]), ValueError, "image must match unary"),
    "image int64": (lambda g: dict(g, image=g["image"].long()), TypeError, "image must be uint8 or a float"),
    "image bool": (lambda g: dict(g, image=g["image"] > 100), TypeError, "image must be uint8 or a float"),
    "image nan": (
        lambda g: dict(g, image=_with(g["image"], (1, 0, 0, 0), float("nan"))),
        ValueError,
        "dense_crf_inference: image must be finite.*batch element\\(s\\) \\[1\\]",
    ),
    "image inf": (
        lambda g: dict(g, image=_with(g["image"], (0, 2, 1, 1), float("inf"))),
        ValueError,
        "dense_crf_inference: image must be finite",
    ),
    "image device": (lambda g: dict(g, image=g["image"].to("meta")), ValueError, "image must have the device"),
    "mask not bool": (lambda g: dict(g, valid_mask=g["valid_mask"].float()), TypeError, "valid_mask must be a bool"),
    "mask shape": (lambda g: dict(g, valid_mask=g["valid_mask"][:, :4]), ValueError, "valid_mask must have shape"),
    "mask 4-D": (lambda g: dict(g, valid_mask=g["valid_mask"][:, None]), ValueError, "valid_mask must have shape"),
    "bilateral sigma_xy zero": (
        lambda g: dict(g, bilateral=(4.0, 0.0, 3.0)),
        ValueError,
        "bilateral sigma_xy must be a positive finite number, got 0.0",
    ),
    "bilateral sigma_rgb negative": (
        lambda g: dict(g, bilateral=(4.0, 55.0, -3.0)),
        ValueError,
        "bilateral sigma_rgb must be a positive",
    ),
    "bilateral sigma nan": (lambda g: dict(g, bilateral=(4.0, float("nan"), 3.0)), ValueError, "bilateral sigma_xy"),
    "bilateral sigma inf": (lambda g: dict(g, bilateral=(4.0, 55.0, float("inf"))), ValueError, "bilateral sigma_rgb"),
    "bilateral weight negative": (
        lambda g: dict(g, bilateral=(-1.0, 55.0, 3.0)),
        ValueError,
        "bilateral weight must be a finite number >= 0",
    ),
    "bilateral weight inf": (lambda g: dict(g, bilateral=(float("inf"), 55.0, 3.0)), ValueError, "bilateral weight"),
    "bilateral weight nan": (lambda g: dict(g, bilateral=(float("nan"), 55.0, 3.0)), ValueError, "bilateral weight"),
    "bilateral too short": (
        lambda g: dict(g, bilateral=(4.0, 55.0)),
        TypeError,
        "bilateral must be a tuple \\(weight, sigma_xy, sigma_rgb\\)",
    ),
    "bilateral a number": (lambda g: dict(g, bilateral=4.0), TypeError, "bilateral must be a tuple"),
    "bilateral string": (lambda g: dict(g, bilateral="abc"), TypeError, "bilateral must be a tuple"),
    "bilateral bool": (lambda g: dict(g, bilateral=(True, 55.0, 3.0)), TypeError, "bilateral weight must be a number"),
    "gaussian sigma zero": (lambda g: dict(g, gaussian=(3.0, 0.0)), ValueError, "gaussian sigma_xy must be a positive"),
    "gaussian weight negative": (
        lambda g: dict(g, gaussian=(-3.0, 3.0)),
        ValueError,
        "gaussian weight must be a finite number >= 0",
    ),
    "gaussian too long": (
        lambda g: dict(g, gaussian=(3.0, 3.0, 3.0)),
        TypeError,
        "gaussian must be a tuple \\(weight, sigma_xy\\)",
    ),
    "gaussian sigma too small": (
        lambda g: dict(g, gaussian=(3.0, 1e-7)),
        ValueError,
        "smoothness kernel's sigma_xy = 1e-07 is too small",
    ),
    "bilateral sigma too small": (
        lambda g: dict(g, bilateral=(4.0, 55.0, 1e-6)),
        ValueError,
        "dense_crf_inference: the features .* too small",
    ),
    "iterations zero": (lambda g: dict(g, iterations=0), ValueError, "iterations must be >= 1, got 0"),
    "iterations negative": (lambda g: dict(g, iterations=-2), ValueError, "iterations must be >= 1"),
    "iterations float": (lambda g: dict(g, iterations=2.0), TypeError, "iterations must be an int"),
    "iterations bool": (lambda g: dict(g, iterations=True), TypeError, "iterations must be an int"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    build, error, message = BAD_INPUTS[case]
    kwargs = build(_good())
    unary, image = kwargs.pop("unary"), kwargs.pop("image")
    with pytest.raises(error, match=message) as info:
        boxloss.dense_crf_inference(unary, image, **kwargs)
    assert str(info.value).startswith("dense_crf_inference: ")


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda u, i, m: (u[0], i, m, 4.0, 5.0, 3.0, 3.0, 3.0, 2), ValueError, "unary must have shape"),
        (lambda u, i, m: (u.int(), i, m, 4.0, 5.0, 3.0, 3.0, 3.0, 2), TypeError, "unary must be float"),
        (lambda u, i, m: (u, i[:, :2], m, 4.0, 5.0, 3.0, 3.0, 3.0, 2), ValueError, "image must have shape"),
        (lambda u, i, m: (u, i[:1], m, 4.0, 5.0, 3.0, 3.0, 3.0, 2), ValueError, "image must match unary"),
        (lambda u, i, m: (u, i.long(), m, 4.0, 5.0, 3.0, 3.0, 3.0, 2), TypeError, "image must be uint8"),
        (lambda u, i, m: (u, i, m.int(), 4.0, 5.0, 3.0, 3.0, 3.0, 2), TypeError, "valid_mask must be a bool"),
        (lambda u, i, m: (u, i, m[:1], 4.0, 5.0, 3.0, 3.0, 3.0, 2), ValueError, "valid_mask must have shape"),
        (lambda u, i, m: (u, i, m, -4.0, 5.0, 3.0, 3.0, 3.0, 2), ValueError, "bilateral weight must be"),
        (lambda u, i, m: (u, i, m, 4.0, 0.0, 3.0, 3.0, 3.0, 2), ValueError, "bilateral sigma_xy must be"),
        (lambda u, i, m: (u, i, m, 4.0, 5.0, -3.0, 3.0, 3.0, 2), ValueError, "bilateral sigma_rgb must be"),
        (lambda u, i, m: (u, i, m, 4.0, 5.0, 3.0, float("nan"), 3.0, 2), ValueError, "gaussian weight must be"),
        (lambda u, i, m: (u, i, m, 4.0, 5.0, 3.0, 3.0, 0.0, 2), ValueError, "gaussian sigma_xy must be"),
        (lambda u, i, m: (u, i, m, 4.0, 5.0, 3.0, 3.0, 3.0, 0), ValueError, "iterations must be >= 1"),
    ],
)
def test_raw_op_rejects_bad_input_without_crashing(args, error, message):
    g = _good()
    with pytest.raises(error, match=message):
        OP(*args(g["unary"], g["image"], g["valid_mask"]))


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="DenseCRF: bilateral sigma_rgb"):
        boxloss.DenseCRF(bilateral=(4.0, 55.0, 0.0))
    with pytest.raises(ValueError, match="DenseCRF: gaussian weight"):
        boxloss.DenseCRF(gaussian=(-1.0, 3.0))
    with pytest.raises(ValueError, match="DenseCRF: iterations must be >= 1"):
        boxloss.DenseCRF(iterations=0)


# ----------------------------------------------------------------- fallback path


def test_fallback_to_reference_matches():
    code = (
        "import warnings, torch, boxloss\n"
        "from boxloss.reference.crf_inference import dense_crf_inference_reference as ref\n"
        "assert not boxloss.extension_loaded()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "u = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64) * 3\n"
        "im = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64) * 255\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    q = boxloss.dense_crf_inference(u, im, iterations=3)\n"
        "torch.testing.assert_close(q, ref(u, im, iterations=3))\n"
        "for bad in (u.masked_fill(u > 2.5, float('nan')), u.masked_fill(u > 2.5, float('-inf'))):\n"
        "    try:\n"
        "        boxloss.dense_crf_inference(bad, im)\n"
        "    except ValueError as e:\n"
        "        assert 'unary' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('fallback accepted bad unaries')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_cuda_kernel_is_registered_when_built_with_cuda():
    from boxloss import _build_info

    assert torch._C._dispatch_has_kernel_for_dispatch_key("boxloss::dense_crf_inference", "CUDA") == bool(
        _build_info.WITH_CUDA
    )
