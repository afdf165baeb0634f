"""CUDA kernels of background attention and background-aware pooling against
the CPU kernels (float64) and gradcheck on the device.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from bana_inputs import make_bana_boxes, make_features

pytestmark = pytest.mark.cuda


CASES = [(1, 1, 1, 1, 1, 1, 1), (2, 5, 9, 11, 3, 4, 2), (3, 64, 41, 41, 16, 4, 2), (2, 16, 128, 96, 5, 2, 3)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(case, dtype):
    B, D, h, w, n, grid, S = case
    f = make_features(B, D, h, w, dtype=dtype, seed=D)
    boxes, batch = make_bana_boxes(B, 8 * h, 8 * w, n, seed=h, special=True)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    outs = []
    for device in ("cpu", "cuda"):
        x = f.to(device).requires_grad_(True)
        att = boxloss.background_attention(x, boxes.to(device), batch.to(device), grid_size=grid, spatial_scale=0.125)
        pooled = boxloss.background_aware_pool(
            x, att.attention, boxes.to(device), batch.to(device), output_size=S, spatial_scale=0.125
        )
        g = torch.Generator().manual_seed(1)
        wp = torch.rand(pooled.shape, generator=g, dtype=dtype).to(device)
        wq = torch.rand(att.queries.shape, generator=g, dtype=dtype).to(device)
        ((pooled * wp).sum() + (att.queries * wq).sum() + att.attention.sum()).backward()
        outs.append(
            [t.detach().cpu() for t in (att.attention, att.queries, pooled, x.grad)]
            + [att.valid.cpu(), att.fallback.cpu()]
        )
    for a, b in zip(outs[0], outs[1]):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, **tol)


def test_cuda_gradcheck_and_opcheck():
    f = make_features(2, 4, 6, 7, device="cuda").requires_grad_(True)
    boxes, batch = make_bana_boxes(2, 12, 14, 2, device="cuda", special=True)
    assert torch.autograd.gradcheck(
        lambda x: boxloss.background_attention(x, boxes, batch, grid_size=2, spatial_scale=0.5)[:2], (f,)
    )
    a = torch.rand(2, 6, 7, dtype=torch.float64, device="cuda").requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: boxloss.background_aware_pool(x, y, boxes, batch, output_size=2, spatial_scale=0.5), (f, a)
    )
    torch.library.opcheck(torch.ops.boxloss.background_attention.default, (f, boxes, batch, 2, 0.5, None, 0.125))
    torch.library.opcheck(torch.ops.boxloss.background_aware_pool.default, (f, a, boxes, batch, 2, 0.5))


def test_cuda_bad_inputs():
    f = make_features(1, 3, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="box_batch must lie"):
        boxloss.background_attention(
            f, torch.tensor([[0.0, 0.0, 2.0, 2.0]], device="cuda"), torch.tensor([3], device="cuda")
        )
    f[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        boxloss.background_attention(
            f, torch.zeros(0, 4, device="cuda"), torch.zeros(0, dtype=torch.long, device="cuda")
        )
