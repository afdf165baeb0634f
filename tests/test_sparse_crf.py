"""boxloss.sparse_crf_loss (CPU kernels) against the pure-PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import boxloss
from sparse_crf_inputs import make_inputs, op_value_and_grad, reference_value_and_grad

OP = torch.ops.boxloss.sparse_crf_loss.default
OP_BACKWARD = torch.ops.boxloss._sparse_crf_loss_backward.default


def test_compiled_ops_are_loaded():
    # Everything below exercises the compiled kernels, not the fallback.
    assert boxloss.extension_loaded(), boxloss.extension_error()


SHAPES = [
    (1, 1, 1, 1),
    (2, 1, 1, 7),
    (2, 3, 6, 1),
    (1, 2, 5, 5),
    (3, 4, 7, 9),
    (2, 21, 13, 11),
    (1, 3, 2, 33),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["l1", "potts"])
@pytest.mark.parametrize("neighbourhood", [4, 8])
@pytest.mark.parametrize("dilation", [1, 2, 40])
def test_matches_reference_float64(shape, kind, neighbourhood, dilation):
    B, C, H, W = shape
    probs, image, _ = make_inputs(B, C, H, W, seed=zlib.crc32(repr((shape, kind, neighbourhood, dilation)).encode()))
    kwargs = dict(kind=kind, neighbourhood=neighbourhood, dilation=dilation, reduction="none")
    value, grad = op_value_and_grad(probs, image, **kwargs)
    ref_value, ref_grad = reference_value_and_grad(probs, image, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mask_fraction", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("channels", [None, [0], [2, 0], [-1]])
@pytest.mark.parametrize("kind", ["l1", "potts"])
def test_mask_and_channels_match_reference(mask_fraction, channels, kind):
    probs, image, mask = make_inputs(3, 3, 9, 8, mask_fraction=mask_fraction, seed=7)
    kwargs = dict(kind=kind, valid_mask=mask, channels=channels, reduction="none", dilation=1, sigma=0.3)
    value, grad = op_value_and_grad(probs, image, **kwargs)
    ref_value, ref_grad = reference_value_and_grad(probs, image, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    if channels is not None:
        unselected = [c for c in range(3) if c not in [ch % 3 for ch in channels]]
        assert torch.all(grad[:, unselected] == 0)


def test_all_invalid_image_contributes_zero():
    probs, image, _ = make_inputs(2, 2, 6, 6, seed=3)
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    mask[1] = False
    value, grad = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
    assert value[1].item() == 0.0 and value[0].item() > 0
    assert torch.all(grad[1] == 0) and torch.any(grad[0] != 0)
    # Only image 0 counts towards |P|; the mean over the batch still divides by B.
    mean = boxloss.sparse_crf_loss(probs, image, valid_mask=mask)
    torch.testing.assert_close(mean, value.sum() / 2)


def test_invalid_pixels_drop_pairs_and_count():
    # A single valid pixel has no valid pair: the loss is exactly 0.
    probs, image, _ = make_inputs(1, 1, 4, 4, seed=5)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    assert boxloss.sparse_crf_loss(probs, image, valid_mask=mask).item() == 0.0


def test_equation_one_by_hand():
    # Two pixels, one pair: L = w * |x_p - x_q| / |P| with |P| = 2.
    probs = torch.tensor([[[[0.9, 0.2]]]], dtype=torch.float64)
    image = torch.tensor([[[[0.1, 0.4]]]], dtype=torch.float64)
    w = torch.exp(torch.tensor(-(0.3**2) / (2 * 0.15**2), dtype=torch.float64))
    expected = w * 0.7 / 2
    torch.testing.assert_close(boxloss.sparse_crf_loss(probs, image, neighbourhood=4), expected)
    potts = w * (0.9 * 0.8 + 0.2 * 0.1) / 2
    torch.testing.assert_close(boxloss.sparse_crf_loss(probs, image, kind="potts"), potts)


def test_reductions():
    probs, image, _ = make_inputs(4, 2, 5, 6, seed=11)
    per_image = boxloss.sparse_crf_loss(probs, image, reduction="none")
    assert per_image.shape == (4,)
    torch.testing.assert_close(boxloss.sparse_crf_loss(probs, image, reduction="sum"), per_image.sum())
    torch.testing.assert_close(boxloss.sparse_crf_loss(probs, image, reduction="mean"), per_image.mean())


def test_l1_gradient_of_ties_is_zero():
    # sign(0) = 0: a constant map has zero gradient under l1.
    probs = torch.full((1, 2, 5, 5), 0.5, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    boxloss.sparse_crf_loss(probs, image).backward()
    assert torch.all(probs.grad == 0)


@pytest.mark.parametrize("kind", ["l1", "potts"])
@pytest.mark.parametrize("neighbourhood", [4, 8])
def test_gradcheck_float64(kind, neighbourhood):
    probs, image, mask = make_inputs(2, 3, 5, 6, mask_fraction=0.2, seed=13, requires_grad=True)
    # Keep l1 away from its kinks (x_p = x_q) so finite differences are valid.
    assert torch.autograd.gradcheck(
        lambda x: boxloss.sparse_crf_loss(
            x, image, kind=kind, neighbourhood=neighbourhood, valid_mask=mask, dilation=1, reduction="none"
        ),
        (probs,),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


def test_gradcheck_channels_and_dilation():
    probs, image, _ = make_inputs(1, 4, 7, 7, seed=17, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: boxloss.sparse_crf_loss(x, image, kind="potts", channels=[3, 1], dilation=3), (probs,)
    )


def test_image_gets_no_gradient():
    probs, image, _ = make_inputs(1, 2, 4, 4, seed=19, requires_grad=True)
    image.requires_grad_()
    boxloss.sparse_crf_loss(probs, image).backward()
    assert image.grad is None and probs.grad is not None


def _opcheck_samples():
    samples = []
    for kind, nb, mask_fraction, channels in [
        ("l1", 8, None, None),
        ("potts", 4, 0.3, [1]),
        ("l1", 4, 0.5, [0, 2]),
    ]:
        probs, image, mask = make_inputs(2, 3, 6, 5, mask_fraction=mask_fraction, seed=23)
        samples.append((probs, image, mask, channels, 0.2, nb, 2 if kind == "potts" else 1, kind))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_forward(sample):
    probs, *rest = _opcheck_samples()[sample]
    torch.library.opcheck(OP, (probs.requires_grad_(), *rest))


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_backward(sample):
    args = _opcheck_samples()[sample]
    grad = torch.rand(args[0].shape[0], dtype=args[0].dtype)
    torch.library.opcheck(OP_BACKWARD, (grad, *args))


def test_torch_compile_fullgraph_matches_eager():
    probs, image, mask = make_inputs(2, 3, 8, 8, mask_fraction=0.2, dtype=torch.float32, seed=29)

    def step(p, im, m):
        return boxloss.sparse_crf_loss(p, im, valid_mask=m, neighbourhood=8, channels=[1, 2], kind="potts") * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x_eager = probs.clone().requires_grad_()
    x_compiled = probs.clone().requires_grad_()
    eager = step(x_eager, image, mask)
    result = compiled(x_compiled, image, mask)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_torch_compile_module_fullgraph():
    module = boxloss.SparseCRFLoss(sigma=0.2, neighbourhood=4)
    probs, image, _ = make_inputs(1, 2, 6, 6, dtype=torch.float32, seed=31)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(probs, image), module(probs, image))


def test_non_contiguous_and_channels_last():
    probs, image, mask = make_inputs(2, 4, 9, 10, mask_fraction=0.2, seed=37)
    expected_value, expected_grad = op_value_and_grad(probs, image, valid_mask=mask)
    # channels_last
    value, grad = op_value_and_grad(
        probs.to(memory_format=torch.channels_last), image.to(memory_format=torch.channels_last), valid_mask=mask
    )
    torch.testing.assert_close(value, expected_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # strided views: every other channel of a bigger tensor, transposed mask
    big = torch.zeros(2, 8, 9, 10, dtype=torch.float64)
    big[:, ::2] = probs
    image_t = image.transpose(2, 3).contiguous().transpose(2, 3)
    mask_t = mask.transpose(1, 2).contiguous().transpose(1, 2)
    x = big.clone().requires_grad_()
    loss = boxloss.sparse_crf_loss(x[:, ::2], image_t, valid_mask=mask_t)
    loss.backward()
    torch.testing.assert_close(loss, expected_value, rtol=0, atol=0)
    torch.testing.assert_close(x.grad[:, ::2], expected_grad, rtol=0, atol=0)
    assert torch.all(x.grad[:, 1::2] == 0)


def test_float32_close_to_float64_reference():
    probs, image, mask = make_inputs(2, 5, 16, 17, mask_fraction=0.1, seed=41)
    kwargs = dict(valid_mask=mask, reduction="none")
    value, grad = op_value_and_grad(probs.float(), image.float(), **kwargs)
    ref_value, ref_grad = reference_value_and_grad(probs, image, **kwargs)
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cpu(dtype):
    # The CPU runs float16/bfloat16 in float32: its error must be no worse than
    # what the same inputs give through plain PyTorch in that dtype.
    probs, image, _ = make_inputs(2, 3, 12, 12, seed=43)
    p_low, im_low = probs.to(dtype), image.to(dtype)
    exact, _ = reference_value_and_grad(p_low.double(), im_low.double(), reduction="none")
    value, grad = op_value_and_grad(p_low, im_low, reduction="none")
    torch_low, _ = reference_value_and_grad(p_low, im_low, reduction="none")
    assert value.dtype == dtype and grad.dtype == dtype
    ours = (value.double() - exact).abs().max().item()
    plain = (torch_low.double() - exact).abs().max().item()
    unit = torch.finfo(dtype).eps * exact.abs().max().item()
    assert ours <= max(plain, unit), (ours, plain)


def test_deterministic_and_thread_independent():
    probs, image, mask = make_inputs(3, 4, 31, 29, mask_fraction=0.1, dtype=torch.float32, seed=47)
    threads = torch.get_num_threads()
    try:
        first = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
        torch.set_num_threads(1)
        single = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
    finally:
        torch.set_num_threads(threads)
    again = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
    for a, b in [(first, single), (first, again)]:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_module_matches_function_and_repr():
    probs, image, mask = make_inputs(2, 2, 5, 5, mask_fraction=0.2, seed=53)
    module = boxloss.SparseCRFLoss(sigma=0.3, neighbourhood=4, dilation=2, kind="potts", channels=[1], reduction="sum")
    expected = boxloss.sparse_crf_loss(
        probs,
        image,
        sigma=0.3,
        neighbourhood=4,
        dilation=2,
        kind="potts",
        channels=[1],
        reduction="sum",
        valid_mask=mask,
    )
    torch.testing.assert_close(module(probs, image, mask), expected)
    assert "potts" in repr(module) and "sigma=0.3" in repr(module)


def test_docstring_example_runs():
    logits = torch.randn(2, 21, 16, 16, requires_grad=True)
    image = torch.rand(2, 3, 16, 16)
    loss = boxloss.sparse_crf_loss(logits.softmax(1), image, sigma=0.15)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- bad input


def _good():
    probs, image, mask = make_inputs(2, 3, 5, 6, mask_fraction=0.2, dtype=torch.float32, seed=59)
    return dict(probs=probs, image=image, valid_mask=mask)


def _call(probs, image, **kwargs):
    return boxloss.sparse_crf_loss(probs, image, **kwargs)


BAD_INPUTS = {
    "probs not a tensor": (lambda g: dict(g, probs=[[1.0]]), TypeError, "probs"),
    "probs 3-D": (lambda g: dict(g, probs=g["probs"][0]), ValueError, "probs must have shape"),
    "probs 5-D": (lambda g: dict(g, probs=g["probs"][None]), ValueError, "probs must have shape"),
    "image 3-D": (lambda g: dict(g, image=g["image"][0]), ValueError, "image must have shape"),
    "batch mismatch": (lambda g: dict(g, image=g["image"][:1]), ValueError, "image must match probs"),
    "height mismatch": (lambda g: dict(g, image=g["image"][:, :, :4]), ValueError, "image must match probs"),
    "width mismatch": (lambda g: dict(g, image=g["image"][..., :5]), ValueError, "image must match probs"),
    "empty batch": (
        lambda g: dict(g, probs=g["probs"][:0], image=g["image"][:0], valid_mask=None),
        ValueError,
        "non-empty",
    ),
    "zero channels": (lambda g: dict(g, probs=g["probs"][:, :0]), ValueError, "non-empty"),
    "image zero channels": (lambda g: dict(g, image=g["image"][:, :0]), ValueError, "image must have at least"),
    "integer probs": (lambda g: dict(g, probs=(g["probs"] > 0.5).long()), TypeError, "probs must be float"),
    "dtype mismatch": (lambda g: dict(g, image=g["image"].double()), TypeError, "image must have the dtype"),
    "mask not bool": (lambda g: dict(g, valid_mask=g["valid_mask"].float()), TypeError, "valid_mask must be a bool"),
    "mask shape": (lambda g: dict(g, valid_mask=g["valid_mask"][:, :4]), ValueError, "valid_mask must have shape"),
    "mask rank": (lambda g: dict(g, valid_mask=g["valid_mask"][0]), ValueError, "valid_mask must have shape"),
    "sigma zero": (lambda g: dict(g, sigma=0.0), ValueError, "sigma"),
    "sigma negative": (lambda g: dict(g, sigma=-1), ValueError, "sigma"),
    "sigma nan": (lambda g: dict(g, sigma=float("nan")), ValueError, "sigma"),
    "sigma inf": (lambda g: dict(g, sigma=float("inf")), ValueError, "sigma"),
    "sigma string": (lambda g: dict(g, sigma="0.1"), TypeError, "sigma"),
    "neighbourhood 6": (lambda g: dict(g, neighbourhood=6), ValueError, "neighbourhood must be 4 or 8"),
    "neighbourhood bool": (lambda g: dict(g, neighbourhood=True), ValueError, "neighbourhood"),
    "dilation zero": (lambda g: dict(g, dilation=0), ValueError, "dilation"),
    "dilation float": (lambda g: dict(g, dilation=1.5), TypeError, "dilation"),
    "kind unknown": (lambda g: dict(g, kind="l2"), ValueError, "kind must be one of"),
    "reduction unknown": (lambda g: dict(g, reduction="avg"), ValueError, "reduction must be one of"),
    "channel out of range": (lambda g: dict(g, channels=[3]), ValueError, "channels must lie in"),
    "channel negative out of range": (lambda g: dict(g, channels=[-4]), ValueError, "channels must lie in"),
    "channel repeated": (lambda g: dict(g, channels=[1, -2]), ValueError, "must not repeat"),
    "channels empty": (lambda g: dict(g, channels=[]), ValueError, "at least one channel"),
    "channels floats": (lambda g: dict(g, channels=[0.5]), TypeError, "channels must hold ints"),
    "channels string": (lambda g: dict(g, channels="01"), TypeError, "channels"),
    "nan in probs": (
        lambda g: dict(g, probs=g["probs"].index_put((torch.tensor([1]),), torch.tensor(float("nan")))),
        ValueError,
        "probs must hold probabilities in \\[0, 1\\], but it contains NaN",
    ),
    "inf in probs": (
        lambda g: dict(g, probs=torch.where(g["probs"] > 0.9, float("inf"), g["probs"])),
        ValueError,
        "contains Inf",
    ),
    "logits as probs": (lambda g: dict(g, probs=g["probs"] * 8 - 4), ValueError, "not logits"),
    "nan in image": (
        lambda g: dict(g, image=torch.where(g["image"] > 0.95, float("nan"), g["image"])),
        ValueError,
        "image must be finite, but it contains NaN",
    ),
    "inf in image": (
        lambda g: dict(g, image=torch.where(g["image"] > 0.95, -float("inf"), g["image"])),
        ValueError,
        "image must be finite, but it contains Inf",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    build, error, message = BAD_INPUTS[case]
    kwargs = build(_good())
    probs, image = kwargs.pop("probs"), kwargs.pop("image")
    with pytest.raises(error, match=message):
        _call(probs, image, **kwargs)


def test_nan_in_unselected_channel_is_ignored():
    g = _good()
    probs = g["probs"].clone()
    probs[:, 0] = float("nan")
    value = boxloss.sparse_crf_loss(probs, g["image"], channels=[1, 2])
    assert torch.isfinite(value)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda p, i, m: (p[0], i, m, None, 0.1, 8, 1, "l1"), ValueError, "probs must have shape"),
        (lambda p, i, m: (p, i[:1], m, None, 0.1, 8, 1, "l1"), ValueError, "image must match"),
        (lambda p, i, m: (p, i, m, [7], 0.1, 8, 1, "l1"), ValueError, "channels must lie in"),
        (lambda p, i, m: (p, i, m, None, -0.1, 8, 1, "l1"), ValueError, "sigma"),
        (lambda p, i, m: (p, i, m, None, 0.1, 5, 1, "l1"), ValueError, "neighbourhood"),
        (lambda p, i, m: (p, i, m, None, 0.1, 8, 0, "l1"), ValueError, "dilation"),
        (lambda p, i, m: (p, i, m, None, 0.1, 8, 1, "huber"), ValueError, "kind"),
        (lambda p, i, m: (p, i.double(), m, None, 0.1, 8, 1, "l1"), TypeError, "dtype"),
        (lambda p, i, m: (p, i, m[:, 1:], None, 0.1, 8, 1, "l1"), ValueError, "valid_mask"),
        (lambda p, i, m: (p, i, m.int(), None, 0.1, 8, 1, "l1"), TypeError, "valid_mask"),
    ],
)
def test_raw_op_rejects_bad_input_without_crashing(args, error, message):
    # Calling torch.ops.boxloss directly skips the Python checks: the C++ op
    # must still raise (never read out of bounds).
    g = _good()
    with pytest.raises(error, match=message):
        OP(*args(g["probs"], g["image"], g["valid_mask"]))


def test_raw_backward_rejects_bad_grad_shape():
    g = _good()
    with pytest.raises(ValueError, match="grad must have shape"):
        OP_BACKWARD(torch.ones(3), g["probs"], g["image"], None, None, 0.1, 8, 1, "l1")


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="SparseCRFLoss: neighbourhood"):
        boxloss.SparseCRFLoss(neighbourhood=3)
    with pytest.raises(ValueError, match="SparseCRFLoss: sigma"):
        boxloss.SparseCRFLoss(sigma=0)
    with pytest.raises(ValueError, match="SparseCRFLoss: reduction"):
        boxloss.SparseCRFLoss(reduction="batchmean")


# ----------------------------------------------------------- fallback path


def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_fallback_to_reference_warns_once_and_matches():
    code = (
        "import warnings, torch, boxloss\n"
        "from boxloss.reference import sparse_crf_loss_reference as ref\n"
        "assert not boxloss.extension_loaded()\n"
        "p = torch.rand(2, 3, 6, 7, dtype=torch.float64); i = torch.rand(2, 3, 6, 7, dtype=torch.float64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = boxloss.sparse_crf_loss(p, i); b = boxloss.sparse_crf_loss(p, i)\n"
        "assert len([x for x in w if 'reference' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "torch.testing.assert_close(a, ref(p, i))\n"
        "try:\n"
        "    boxloss.sparse_crf_loss(p * 5, i)\n"
        "except ValueError as e:\n"
        "    assert 'probs' in str(e)\n"
        "else:\n"
        "    raise AssertionError('fallback accepted logits')\n"
        "print('ok')\n"
    )
    result = _run_python(code, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_required_extension_raises_with_reason():
    code = (
        "import torch, boxloss\n"
        "try:\n"
        "    boxloss.sparse_crf_loss(torch.rand(1, 1, 2, 2), torch.rand(1, 3, 2, 2))\n"
        "except RuntimeError as e:\n"
        "    assert 'BOXLOSS_DISABLE_EXTENSION' in str(e), str(e); print('ok')\n"
    )
    result = _run_python(code, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="1")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cuda_kernels_are_compiled_when_built_with_cuda():
    from boxloss import _build_info

    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("boxloss::sparse_crf_loss", "CUDA")
    assert has_cuda_kernel == bool(_build_info.WITH_CUDA)
    assert boxloss.cuda_kernels_built() == bool(_build_info.WITH_CUDA)
