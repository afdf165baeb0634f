"""Evaluation on held-out data: predicted label maps, confusion matrices and mIoU, summed across processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

import boxloss
from boxloss.data import Sample, collate_samples
from boxloss.trainers.engine import distributed
from boxloss.trainers.engine.models import head_outputs


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 16,
    head: str = "logits",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The model's ``head`` on (N, 3, H, W) images in [0, 1], in eval mode, batch by batch, on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(head_outputs(model(images[i : i + batch_size].to(device)))[head].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def segmentation_confusion(
    model: nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(C + 1, C + 1) confusion matrix of the model's argmax against the samples' masks (void ignored).

    Each process evaluates every ``world``-th sample and the matrices are summed. ``predict(model, images)`` may
    replace the plain argmax (for post-processing such as CRF inference); it returns (B, H, W) labels.
    """
    C = num_classes + 1
    cm = torch.zeros(C, C, dtype=torch.long)
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, len(samples), world))
    for i in range(0, len(mine), batch_size):
        batch = collate_samples([samples[j] for j in mine[i : i + batch_size]])
        if predict is None:
            labels = predict_logits(model, batch.images, batch_size=batch_size, device=device).argmax(1)
        else:
            labels = predict(model, batch.images).cpu()
        target = batch.masks.masked_fill(~batch.valid, 255)
        cm += boxloss.confusion_matrix(labels, target, C)
    return distributed.all_reduce_sum(cm)


def miou_percent(cm: torch.Tensor) -> float:
    """mIoU of a confusion matrix, in percent."""
    return round(100 * float(boxloss.mean_iou(cm)[0]), 2)


def label_miou(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor], num_classes: int) -> float:
    """mIoU in percent of label maps against true ones; pixels void (255) in either are left out, as in Box to Tag
    and Back's Table 2, which reports the share of new void pixels beside the mIoU."""
    C = num_classes + 1
    cm = torch.zeros(C, C, dtype=torch.long)
    for p, t in zip(pred, target):
        p = p.long()
        keep = (t != 255) & (p != 255)
        cm += boxloss.confusion_matrix(p[keep], t[keep].long(), C)
    return miou_percent(cm)
