"""Input builders shared by the box-prior tests (CPU and CUDA) and benchmarks."""

from __future__ import annotations

import torch


def make_probs(B, C, H, W, *, dtype=torch.float64, device="cpu", seed=0, softmax=False, levels=None):
    """Random probabilities; ``levels`` quantises them to that many values (ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    if softmax:
        x = (4 * x).softmax(1)
    if levels is not None:
        x = torch.round(x * (levels - 1)) / (levels - 1)
    return x.to(device=device, dtype=dtype)


def make_boxes(B, C, image_h, image_w, boxes_per_image, *, seed=0, device="cpu", dtype=torch.float64, special=True):
    """Random boxes in image pixels, plus (when ``special``) the edge cases of the
    convention: a box touching every border, a 1-pixel box, a box partly
    outside the image, a duplicate, a zero-width box and a box wholly outside."""
    g = torch.Generator().manual_seed(seed)
    K = B * boxes_per_image
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([image_w, image_h])
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([image_w, image_h]) * 0.6 + 0.5
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([image_w, image_h], dtype=torch.float64))], 1)
    batch = torch.arange(B).repeat_interleave(boxes_per_image)
    labels = torch.randint(0, C, (K,), generator=g)
    if special:
        extra = torch.tensor(
            [
                [0.0, 0.0, image_w, image_h],  # touches every border
                [1.0, 1.0, 2.0, 2.0],  # one pixel
                [-5.0, image_h * 0.5, image_w * 0.4, image_h + 7.0],  # partly outside
                [2.0, 3.0, 2.0, 9.0],  # zero width: empty
                [image_w + 1.0, 0.0, image_w + 9.0, 5.0],  # wholly outside: empty
            ],
            dtype=torch.float64,
        )
        boxes = torch.cat([boxes, extra, boxes[:1]])  # and a duplicate of box 0
        batch = torch.cat([batch, torch.tensor([0, B - 1, 0, B - 1, 0]), batch[:1]])
        labels = torch.cat([labels, torch.tensor([C - 1, 0, min(1, C - 1), 0, 0]), labels[:1]])
    return boxes.to(device=device, dtype=dtype), batch.to(device), labels.to(device)
