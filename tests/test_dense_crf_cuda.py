"""CUDA kernels of the permutohedral lattice, bilateral_filter and dense_crf_loss
against the CPU kernels and the references.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda

The GPU numbers lattice vertices by hash slot (the CPU by first use), and its
splat adds with atomics, so lattices are compared through what they compute,
and float results to rounding rather than bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from boxloss.reference import dense_crf_loss_lattice_reference, dense_crf_loss_reference
from dense_crf_inputs import at_scale, natural_batch, random_inputs, relative_error, value_and_grad

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(
    "shape, sigma_xy, sigma_rgb",
    [((1, 1, 1), 3.0, 15.0), ((2, 9, 1), 2.0, 10.0), ((3, 33, 29), 1.0, 3.0), ((2, 64, 48), 20.0, 15.0)],
)
def test_cuda_lattice_describes_the_cpu_lattice(shape, sigma_xy, sigma_rgb):
    B, H, W = shape
    image = random_inputs(B, 1, H, W, seed=H * W)[1]
    cpu = boxloss.PermutohedralLattice(image, sigma_xy, sigma_rgb)
    gpu = boxloss.PermutohedralLattice(image.cuda(), sigma_xy, sigma_rgb)
    assert gpu.num_vertices == cpu.num_vertices
    torch.testing.assert_close(gpu.tensors.splat_weight.cpu(), cpu.tensors.splat_weight, rtol=0, atol=1e-12)
    # Vertex numbers differ; what the lattices compute must not.
    values = torch.rand(B, 5, H, W, dtype=torch.float64)
    for reverse in (False, True):
        torch.testing.assert_close(
            gpu.filter(values.cuda(), reverse=reverse).cpu(),
            cpu.filter(values, reverse=reverse),
            rtol=1e-10,
            atol=1e-12,
        )


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (3, 21, 33, 17), (1, 2, 1, 300), (2, 4, 130, 70)])
@pytest.mark.parametrize("mask_fraction", [None, 0.3])
@pytest.mark.parametrize("scale_factor", [1.0, 0.5])
def test_cuda_loss_matches_cpu_and_reference_float64(shape, mask_fraction, scale_factor, to_cuda):
    B, C, H, W = shape
    if min(H, W) * scale_factor < 1:
        pytest.skip("no pixel left at this scale")
    probs, image, mask = random_inputs(B, C, H, W, seed=B * 100 + C, mask_fraction=mask_fraction)
    kwargs = dict(sigma_xy=5.0, sigma_rgb=15.0, scale_factor=scale_factor, reduction="none")
    cpu_value, cpu_grad = value_and_grad(boxloss.dense_crf_loss, probs, image, valid_mask=mask, **kwargs)
    p, im, m = to_cuda(probs, image, mask)
    value, grad = value_and_grad(boxloss.dense_crf_loss, p, im, valid_mask=m, **kwargs)
    assert value.device.type == "cuda" and grad.device.type == "cuda"
    torch.testing.assert_close(value.cpu(), cpu_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-9, atol=1e-12)
    if H * W <= 64:
        ref_value, ref_grad = value_and_grad(
            at_scale(dense_crf_loss_lattice_reference), probs, image, valid_mask=mask, **kwargs
        )
        torch.testing.assert_close(value.cpu(), ref_value, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-6, atol=1e-12)


def test_cuda_float32_close_to_cpu_and_brute_force(to_cuda):
    logits, image, valid = natural_batch(2, 48, 4, seed=3, dtype=torch.float32, with_mask=True)
    kwargs = dict(sigma_xy=10.0, valid_mask=valid, reduction="none")
    cpu_value, cpu_grad = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, **kwargs)
    lg, im, m = to_cuda(logits, image, valid)
    value, grad = value_and_grad(boxloss.dense_crf_loss, lg.softmax(1), im, **dict(kwargs, valid_mask=m))
    torch.testing.assert_close(value.cpu(), cpu_value, rtol=1e-4, atol=1e-7)
    assert relative_error(grad.cpu(), cpu_grad) < 1e-4
    exact = dense_crf_loss_reference(logits.softmax(1).double(), image.double(), **kwargs)
    assert torch.all((value.cpu().double() - exact).abs() <= 0.02 * exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_runs_in_float32(dtype):
    logits, image, _ = natural_batch(1, 32, 4, seed=4, dtype=torch.float32, device="cuda")
    probs = logits.softmax(1).to(dtype)
    value, grad = value_and_grad(boxloss.dense_crf_loss, probs, image)
    exact, exact_grad = value_and_grad(boxloss.dense_crf_loss, probs.float(), image)
    assert value.dtype == dtype and grad.dtype == dtype
    assert abs(value.float().item() - exact.item()) <= 2 * torch.finfo(dtype).eps * exact.item()
    assert relative_error(grad.float(), exact_grad) <= 2 * torch.finfo(dtype).eps


def test_cuda_gradcheck():
    probs, image, mask = random_inputs(2, 3, 5, 6, seed=5, mask_fraction=0.2, device="cuda")
    probs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: boxloss.dense_crf_loss(p, image, sigma_xy=2.0, sigma_rgb=30.0, valid_mask=mask, reduction="none"),
        (probs,),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )
    values = torch.rand(2, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: boxloss.bilateral_filter(v, image, 2.0, 30.0), (values,))


def test_cuda_opcheck():
    probs, image, mask = random_inputs(2, 3, 5, 6, seed=6, mask_fraction=0.3, device="cuda")
    lattice = torch.ops.boxloss.permutohedral_lattice.default(image, 3.0, 20.0)
    torch.library.opcheck(torch.ops.boxloss.permutohedral_lattice.default, (image, 3.0, 20.0))
    torch.library.opcheck(torch.ops.boxloss.lattice_filter.default, (probs.clone().requires_grad_(), *lattice, False))
    torch.library.opcheck(torch.ops.boxloss.dense_crf_loss.default, (probs.clone().requires_grad_(), mask, *lattice))
    grad = torch.rand(2, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.boxloss._dense_crf_loss_backward.default, (grad, probs, mask, *lattice))


def test_cuda_compile_fullgraph():
    logits, image, _ = natural_batch(2, 16, 3, seed=7, dtype=torch.float32, device="cuda")
    fn = lambda x: boxloss.dense_crf_loss(x.softmax(1), image, sigma_xy=8.0)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(logits), fn(logits))


def test_cuda_bad_input_raises():
    probs, image, _ = random_inputs(2, 3, 8, 8, seed=8, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="probs must hold probabilities"):
        boxloss.dense_crf_loss(probs * 4, image)
    bad = image.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="image must be finite"):
        boxloss.dense_crf_loss(probs, bad)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        boxloss.dense_crf_loss(probs, image[:, :2])
    lattice = torch.ops.boxloss.permutohedral_lattice.default(image, 3.0, 15.0)
    with pytest.raises(ValueError, match="outside its image's range"):
        torch.ops.boxloss.lattice_filter.default(probs, lattice[0].clone().fill_(10**6), *lattice[1:], False)
    with pytest.raises(ValueError, match="must be on the device"):
        boxloss.dense_crf_loss(probs, image.cpu())


def test_cuda_repeated_calls_agree_to_rounding():
    # The splat adds with atomics: results may differ in the last bits, no more.
    logits, image, valid = natural_batch(3, 64, 6, seed=9, dtype=torch.float32, device="cuda", with_mask=True)
    first = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, valid_mask=valid, reduction="none")
    second = value_and_grad(boxloss.dense_crf_loss, logits.softmax(1), image, valid_mask=valid, reduction="none")
    torch.testing.assert_close(first[0], second[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(first[1], second[1], rtol=1e-4, atol=1e-7)
