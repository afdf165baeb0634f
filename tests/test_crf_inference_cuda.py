"""CUDA kernel of boxloss.dense_crf_inference against the CPU kernel, the reference and pydensecrf.

Marked ``cuda``: skipped where no CUDA device is present (CI compiles the kernels but has no GPU), failed
where a device is present and boxloss was built without CUDA kernels (tests/conftest.py); run them on any
machine with one: python -m pytest tests -m cuda

The GPU numbers the appearance lattice's vertices by hash slot and splats with atomics, so results
are compared to rounding, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from boxloss.reference.crf_inference import dense_crf_inference_reference
from dense_crf_inputs import natural_batch, pydensecrf_inference_or_skip

pytestmark = pytest.mark.cuda

OP = torch.ops.boxloss.dense_crf_inference.default
BANA = dict(bilateral=(4.0, 55.0, 3.0), gaussian=(3.0, 3.0), iterations=10)


def _unaries(B, C, size, seed, dtype=torch.float64, with_mask=False):
    logits, image, valid = natural_batch(B, size, C, seed=seed, dtype=dtype, with_mask=with_mask)
    return -logits.log_softmax(1), image, valid


@pytest.mark.parametrize("B, C, size", [(1, 1, 1), (1, 2, 7), (2, 5, 33), (3, 21, 40)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_cuda_matches_cpu_and_reference_float64(B, C, size, with_mask, to_cuda):
    unary, image, valid = _unaries(B, C, size, seed=B + C + size, with_mask=True)
    valid = valid if with_mask else None
    for settings in (
        BANA,
        dict(bilateral=(5.0, 10.0, 15.0), gaussian=(0.0, 3.0), iterations=3),
        dict(bilateral=(0.0, 10.0, 15.0), gaussian=(3.0, 1.0), iterations=3),
    ):
        cpu = boxloss.dense_crf_inference(unary, image, valid_mask=valid, **settings)
        gpu = boxloss.dense_crf_inference(*to_cuda(unary, image), valid_mask=to_cuda(valid)[0], **settings)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
        if size <= 33:
            ref = dense_crf_inference_reference(unary, image, valid_mask=valid, **settings)
            torch.testing.assert_close(gpu.cpu(), ref, rtol=1e-6, atol=1e-9)


def test_cuda_float32_agrees_with_pydensecrf(to_cuda):
    unary, image, _ = _unaries(2, 21, 96, seed=1, dtype=torch.float32)
    image8 = image.round().clamp(0, 255).to(torch.uint8)
    expected = pydensecrf_inference_or_skip(unary, image8, **BANA)
    q = boxloss.dense_crf_inference(*to_cuda(unary, image8), **BANA).cpu()
    assert float((q.argmax(1) == expected.argmax(1)).float().mean()) >= 0.999
    assert float((q - expected).abs().max()) <= 1e-3


def test_cuda_impossible_labels_and_invalid_pixels(to_cuda):
    unary, image, valid = _unaries(2, 4, 24, seed=2, with_mask=True)
    unary[0, 1] = float("inf")
    q = boxloss.dense_crf_inference(*to_cuda(unary, image), valid_mask=to_cuda(valid)[0], **BANA).cpu()
    assert torch.all(q[0, 1] == 0)
    q0 = torch.softmax(-unary, 1)
    invalid = ~valid[:, None].expand_as(q)
    torch.testing.assert_close(q[invalid], q0[invalid], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_dtypes(dtype):
    unary, image, _ = _unaries(1, 5, 20, seed=3, dtype=torch.float32)
    q = boxloss.dense_crf_inference(unary.to(dtype).cuda(), image.to(torch.uint8).cuda(), **BANA)
    assert q.dtype == dtype
    expected = boxloss.dense_crf_inference(unary.to(dtype).float(), image.to(torch.uint8), **BANA)
    torch.testing.assert_close(q.float().cpu(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)


def test_cuda_bad_unaries_raise(to_cuda):
    unary, image, _ = _unaries(1, 3, 8, seed=4, dtype=torch.float32)
    unary[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="unary must not contain NaN"):
        boxloss.dense_crf_inference(*to_cuda(unary, image))
    unary[0, :, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="every class"):
        boxloss.dense_crf_inference(*to_cuda(unary, image))
    with pytest.raises(ValueError, match="image must have the device"):
        boxloss.dense_crf_inference(unary.cuda(), image)


def test_cuda_opcheck(to_cuda):
    unary, image, valid = _unaries(2, 3, 9, seed=5, dtype=torch.float32, with_mask=True)
    torch.library.opcheck(OP, (*to_cuda(unary, image, valid), 4.0, 5.0, 10.0, 3.0, 2.0, 3))


def test_cuda_torch_compile_fullgraph(to_cuda):
    unary, image, _ = _unaries(2, 4, 20, seed=6, dtype=torch.float32)
    unary, image = to_cuda(unary, image)

    def labels(u, im):
        return boxloss.dense_crf_inference(u, im, **BANA).argmax(1)

    compiled = torch.compile(labels, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(unary, image), labels(unary, image))
