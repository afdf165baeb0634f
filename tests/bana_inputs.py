"""Input builders shared by the BANA tests (CPU and CUDA) and the benchmark."""

from __future__ import annotations

import torch


def make_features(B, D, h, w, *, dtype=torch.float64, device="cpu", seed=0, offset=0.3):
    """Random features with a common offset, so that cosines are spread over (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, h, w, generator=g, dtype=torch.float64) + offset
    return x.to(device=device, dtype=dtype)


def make_bana_boxes(
    B, image_h, image_w, boxes_per_image, *, seed=0, device="cpu", dtype=torch.float64, max_frac=0.5, special=False
):
    """Random boxes in image pixels covering at most ``max_frac`` of each side, so most
    images keep enough background; ``special`` adds a 1-pixel box, a box partly outside,
    a zero-width (empty) box and a box wholly outside."""
    g = torch.Generator().manual_seed(seed)
    K = B * boxes_per_image
    size = torch.tensor([image_w, image_h], dtype=torch.float64)
    wh = (torch.rand(K, 2, generator=g, dtype=torch.float64) * max_frac + 0.05) * size
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * (size - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    batch = torch.arange(B).repeat_interleave(boxes_per_image)
    if special:
        extra = torch.tensor(
            [
                [1.0, 1.0, 2.0, 2.0],
                [-5.0, image_h * 0.6, image_w * 0.3, image_h + 7.0],
                [2.0, 3.0, 2.0, 9.0],
                [image_w + 1.0, 0.0, image_w + 9.0, 5.0],
            ],
            dtype=torch.float64,
        )
        boxes = torch.cat([boxes, extra])
        batch = torch.cat([batch, torch.tensor([0, B - 1, 0, B - 1])])
    return boxes.to(device=device, dtype=dtype), batch.to(device)
