"""CUDA kernels of the box row/column-max op against the CPU kernels and the reference.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from box_inputs import make_boxes, make_probs
from boxloss.reference.box_priors import box_row_col_max_reference

pytestmark = pytest.mark.cuda

OP = torch.ops.boxloss.box_row_col_max.default


CASES = [
    (1, 1, 1, 1, 1, 1.0),
    (2, 3, 7, 9, 3, 1.0),
    (2, 21, 33, 17, 8, 0.125),
    (1, 2, 1, 300, 4, 1.0),
    (2, 4, 130, 70, 16, 0.5),
]


def _inputs(case, **kw):
    B, C, H, W, n, scale = case
    probs = make_probs(B, C, H, W, seed=B * 100 + C, **kw)
    boxes, batch, labels = make_boxes(B, C, H / scale, W / scale, n, seed=H * 7 + W)
    return probs, boxes, batch, labels, scale


def _run(probs, boxes, batch, labels, scale, device):
    x = probs.detach().to(device).requires_grad_()
    out = OP(x, boxes.to(device), batch.to(device), labels.to(device), scale)
    g_row = torch.linspace(0, 1, out[0].numel(), dtype=probs.dtype).view_as(out[0]).to(device)
    g_col = torch.linspace(1, 2, out[1].numel(), dtype=probs.dtype).view_as(out[1]).to(device)
    (grad,) = torch.autograd.grad((out[0] * g_row).sum() + (out[1] * g_col).sum(), x)
    return [t.cpu() for t in out] + [grad.cpu()]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("levels", [None, 3])
def test_cuda_matches_cpu_and_reference_float64(case, levels):
    probs, boxes, batch, labels, scale = _inputs(case, levels=levels)
    cpu = _run(probs, boxes, batch, labels, scale, "cpu")
    cuda = _run(probs, boxes, batch, labels, scale, "cuda")
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b)  # maxima are exact and ties resolve identically
    ref_row, ref_col, ref_ranges = box_row_col_max_reference(probs, boxes, batch, labels, scale)
    assert torch.equal(cuda[0], ref_row) and torch.equal(cuda[1], ref_col) and torch.equal(cuda[4], ref_ranges)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_low_precision_is_exact(dtype):
    probs, boxes, batch, labels, scale = _inputs(CASES[2], softmax=True)
    cpu = _run(probs.to(dtype), boxes, batch, labels, scale, "cpu")
    cuda = _run(probs.to(dtype), boxes, batch, labels, scale, "cuda")
    assert torch.equal(cpu[0], cuda[0]) and torch.equal(cpu[1], cuda[1])
    torch.testing.assert_close(cuda[5], cpu[5])


def test_cuda_losses_match_cpu_and_gradcheck():
    probs, boxes, batch, labels, scale = _inputs(CASES[1], softmax=True)
    for fn in (boxloss.tight_box_loss, boxloss.mil_box_loss, boxloss.projection_loss):
        x_cpu = probs.clone().requires_grad_()
        x_cuda = probs.cuda().requires_grad_()
        a = fn(x_cpu, boxes, batch, labels, spatial_scale=scale)
        b = fn(x_cuda, boxes.cuda(), batch.cuda(), labels.cuda(), spatial_scale=scale)
        a.backward()
        b.backward()
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x_cuda.grad.cpu(), x_cpu.grad, rtol=1e-12, atol=1e-14)
        assert torch.autograd.gradcheck(
            lambda p, fn=fn: fn(p, boxes.cuda(), batch.cuda(), labels.cuda(), spatial_scale=scale),
            (probs.cuda().requires_grad_(),),
        )


def test_cuda_opcheck_and_compile():
    probs, boxes, batch, labels, scale = _inputs(CASES[1])
    torch.library.opcheck(OP, (probs.cuda().requires_grad_(), boxes.cuda(), batch.cuda(), labels.cuda(), scale))
    p = probs.float().cuda()

    def step(x):
        return boxloss.mil_box_loss(x, boxes.float().cuda(), batch.cuda(), labels.cuda(), spatial_scale=scale)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(p), step(p))


def test_cuda_bad_input_raises():
    probs, boxes, batch, labels, scale = _inputs(CASES[1])
    probs, boxes, batch, labels = probs.cuda(), boxes.cuda(), batch.cuda(), labels.cuda()
    with pytest.raises(ValueError, match="box_batch must lie"):
        OP(probs, boxes, batch + 5, labels, scale)
    bad = boxes.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="must not hold NaN"):
        OP(probs, bad, batch, labels, scale)
    with pytest.raises(ValueError, match="probs must not hold NaN inside a box"):
        OP(torch.full_like(probs, float("nan")), boxes, batch, labels, scale)
    with pytest.raises(ValueError, match="must be on the device of probs"):
        OP(probs, boxes.cpu(), batch, labels, scale)
