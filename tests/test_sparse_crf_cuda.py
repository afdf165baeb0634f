"""CUDA kernels of boxloss.sparse_crf_loss against the CPU kernels and the reference.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from sparse_crf_inputs import make_inputs, op_value_and_grad, reference_value_and_grad

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (3, 21, 33, 17), (1, 2, 1, 300), (2, 4, 130, 70)])
@pytest.mark.parametrize("kind", ["l1", "potts"])
@pytest.mark.parametrize("neighbourhood", [4, 8])
@pytest.mark.parametrize("dilation", [1, 3])
@pytest.mark.parametrize("mask_fraction", [None, 0.3])
def test_cuda_matches_cpu_and_reference_float64(shape, kind, neighbourhood, dilation, mask_fraction, to_cuda):
    B, C, H, W = shape
    probs, image, mask = make_inputs(B, C, H, W, mask_fraction=mask_fraction, seed=B * 100 + C)
    kwargs = dict(kind=kind, neighbourhood=neighbourhood, dilation=dilation, reduction="none")
    cpu_value, cpu_grad = op_value_and_grad(probs, image, valid_mask=mask, **kwargs)
    ref_value, ref_grad = reference_value_and_grad(probs, image, valid_mask=mask, **kwargs)
    p, im, m = to_cuda(probs, image, mask)
    value, grad = op_value_and_grad(p, im, valid_mask=m, **kwargs)
    assert value.device.type == "cuda" and grad.device.type == "cuda"
    torch.testing.assert_close(value.cpu(), ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(value.cpu(), cpu_value, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("channels", [[0], [2, -1]])
def test_cuda_channels_float32(channels, to_cuda):
    probs, image, mask = make_inputs(2, 4, 40, 50, mask_fraction=0.1, dtype=torch.float32, seed=3)
    kwargs = dict(channels=channels, valid_mask=mask, reduction="none")
    cpu_value, cpu_grad = op_value_and_grad(probs, image, **kwargs)
    p, im, m = to_cuda(probs, image, mask)
    value, grad = op_value_and_grad(p, im, channels=channels, valid_mask=m, reduction="none")
    torch.testing.assert_close(value.cpu(), cpu_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_accumulates_in_float32(dtype):
    probs, image, _ = make_inputs(2, 21, 64, 64, seed=5)
    p, im = probs.to("cuda", dtype), image.to("cuda", dtype)
    exact, exact_grad = reference_value_and_grad(p.double().cpu(), im.double().cpu(), reduction="none")
    value, grad = op_value_and_grad(p, im, reduction="none")
    plain, _ = reference_value_and_grad(p, im, reduction="none")  # plain PyTorch in `dtype` on CUDA
    assert value.dtype == dtype and grad.dtype == dtype
    ours = (value.double().cpu() - exact).abs().max().item()
    theirs = (plain.double().cpu() - exact).abs().max().item()
    assert ours <= max(theirs, torch.finfo(dtype).eps * exact.abs().max().item())
    grad_err = (grad.double().cpu() - exact_grad).abs().max().item()
    assert grad_err <= 4 * torch.finfo(dtype).eps * exact_grad.abs().max().item()


def test_cuda_gradcheck():
    probs, image, mask = make_inputs(2, 3, 6, 7, mask_fraction=0.2, device="cuda", seed=7, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: boxloss.sparse_crf_loss(x, image, valid_mask=mask, kind="potts", reduction="none"), (probs,)
    )
    assert torch.autograd.gradcheck(lambda x: boxloss.sparse_crf_loss(x, image, neighbourhood=4), (probs,))


def test_cuda_opcheck():
    probs, image, mask = make_inputs(2, 3, 6, 5, mask_fraction=0.3, device="cuda", seed=9)
    args = (image, mask, [0, 2], 0.2, 8, 1, "l1")
    torch.library.opcheck(torch.ops.boxloss.sparse_crf_loss.default, (probs.requires_grad_(), *args))
    grad = torch.rand(2, device="cuda", dtype=probs.dtype)
    torch.library.opcheck(torch.ops.boxloss._sparse_crf_loss_backward.default, (grad, probs.detach(), *args))


def test_cuda_compile_fullgraph():
    probs, image, _ = make_inputs(2, 3, 16, 16, dtype=torch.float32, device="cuda", seed=11)
    fn = lambda p: boxloss.sparse_crf_loss(p, image, kind="potts")  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(probs), fn(probs))


def test_cuda_deterministic():
    probs, image, mask = make_inputs(4, 5, 100, 90, mask_fraction=0.1, dtype=torch.float32, device="cuda", seed=13)
    first = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
    second = op_value_and_grad(probs, image, valid_mask=mask, reduction="none")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cuda_bad_values_raise():
    probs, image, _ = make_inputs(2, 3, 8, 8, dtype=torch.float32, device="cuda", seed=15)
    with pytest.raises(ValueError, match="probs must hold probabilities"):
        boxloss.sparse_crf_loss(probs * 4, image)
    bad_image = image.clone()
    bad_image[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="image must be finite"):
        boxloss.sparse_crf_loss(probs, bad_image)


def test_cuda_device_mismatch_raises():
    probs, image, mask = make_inputs(1, 2, 4, 4, dtype=torch.float32, seed=17)
    with pytest.raises(ValueError, match="image must have the device of probs"):
        boxloss.sparse_crf_loss(probs.cuda(), image)
    with pytest.raises(ValueError, match="valid_mask must have the device of probs"):
        boxloss.sparse_crf_loss(probs.cuda(), image.cuda(), valid_mask=mask)


def test_cuda_non_contiguous_and_channels_last():
    probs, image, _ = make_inputs(2, 4, 20, 24, dtype=torch.float32, device="cuda", seed=19)
    expected = op_value_and_grad(probs, image)
    got = op_value_and_grad(probs.to(memory_format=torch.channels_last), image.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
