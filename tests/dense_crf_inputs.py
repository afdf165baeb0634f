"""Input builders shared by the DenseCRF / lattice / CRF inference tests (CPU and CUDA) and benchmarks/dense_crf.py,
and pydensecrf's inference for the tests that compare with it.

Natural-looking images come from the package's synthetic benchmark (textured
objects and backgrounds, blur, noise, colours in [0, 255]); their probability
maps are a blurred one-hot of the true mask plus noise, through a softmax.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _sample(size: int, seed: int):
    """A synthetic image (and mask) of at least 16 pixels (the generator's minimum), cropped to size."""
    from boxloss.data import SyntheticConfig, generate_sample

    s = generate_sample(SyntheticConfig(image_size=max(size, 16)), "train", seed)
    return s.image[:size, :size].copy(), s.mask[:size, :size].copy()


def natural_image(size: int, seed: int = 0, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(1, 3, size, size) colours in [0, 255]."""
    image, _ = _sample(size, seed)
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(device=device, dtype=dtype).contiguous()


def natural_batch(
    B: int, size: int, C: int, *, seed: int = 0, dtype=torch.float64, device="cpu", with_mask: bool = False
):
    """(logits (B, C, H, W), image (B, 3, H, W), valid (B, H, W) or None): smooth logits that
    follow the objects of the image, as a network's would; valid drops the void band."""
    images, logits, masks = [], [], []
    g = torch.Generator().manual_seed(seed)
    for b in range(B):
        image, mask = _sample(size, seed + b)
        m = torch.from_numpy(mask.astype(np.int64))
        masks.append(m != 255)
        labels = torch.where(m == 255, torch.zeros_like(m), m) % C
        onehot = F.one_hot(labels, C).permute(2, 0, 1).to(torch.float64)[None]
        logits.append(
            4 * F.avg_pool2d(onehot, 7, 1, 3) + torch.randn(1, C, size, size, generator=g, dtype=torch.float64)
        )
        images.append(torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float64))
    valid = torch.stack(masks).to(device) if with_mask else None
    return (torch.cat(logits).to(device=device, dtype=dtype), torch.cat(images).to(device=device, dtype=dtype), valid)


def random_inputs(B, C, H, W, *, dtype=torch.float64, device="cpu", seed=0, mask_fraction=None):
    """(probs (softmax), image in [0, 255], mask or None): random colours, the lattice's hardest case."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).softmax(1)
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255
    mask = None
    if mask_fraction is not None:
        mask = torch.rand(B, H, W, generator=g) >= mask_fraction
        mask = mask.to(device)
    return probs.to(device=device, dtype=dtype), image.to(device=device, dtype=dtype), mask


def value_and_grad(fn, probs, *args, **kwargs):
    """fn(probs, ...) and d(sum of it)/d probs."""
    x = probs.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), x.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def at_scale(reference):
    """A reference loss (full resolution only) that takes ``scale_factor``: the inputs are resized as the op
    resizes them (boxloss.ops.dense_crf._resize_like_tang, differentiable in probs) and sigma_xy scaled."""
    from boxloss.ops.dense_crf import _resize_like_tang

    def loss(probs, image, *, scale_factor=1.0, sigma_xy=80.0, valid_mask=None, **kwargs):
        if scale_factor != 1.0:
            probs, image, valid_mask = _resize_like_tang(probs, image, valid_mask, scale_factor)
            sigma_xy = sigma_xy * scale_factor
        return reference(probs, image, sigma_xy=sigma_xy, valid_mask=valid_mask, **kwargs)

    return loss


def pydensecrf_inference_or_skip(unary, image, **settings):
    """Krähenbühl's inference through pydensecrf (boxloss.reference.crf_inference.pydensecrf_inference); the test
    is skipped where pydensecrf is not installed, and fails, with the reason, where its build does not run."""
    import pytest

    from boxloss._pydensecrf import PyDenseCRFUnavailable
    from boxloss.reference.crf_inference import pydensecrf_inference

    try:
        return pydensecrf_inference(unary, image, **settings)
    except PyDenseCRFUnavailable as exc:
        if exc.installed:
            raise
        pytest.skip(str(exc))
