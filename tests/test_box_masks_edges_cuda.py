"""Box tensors and merged pseudo labels with far box corners on CUDA, against the CPU.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda
"""

from __future__ import annotations

import pytest
import torch

from boxloss.ops.box_masks import box_priority, boxes_to_masks
from boxloss.recipes.pseudo_labels import merge_box_masks

pytestmark = pytest.mark.cuda

HUGE = [float("inf"), 1e12, 1e30, 3.4e38]


def _boxes(big):
    boxes = torch.tensor(
        [[-big, -big, big, big], [2.0, 2.0, 5.0, 5.0], [0.0, 3.0, big, 4.0], [big, big, big, big], [1.0, 1.0, 7.0, 7.0]]
    )
    return boxes, torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 2, 1, 2, 3])


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("order", ["smaller-front", "larger-front", "later-front"])
@pytest.mark.parametrize("form", ["onehot", "labels", "union"])
def test_far_corners_cuda_matches_cpu(big, order, form):
    boxes, batch, labels = _boxes(big)
    cpu = boxes_to_masks(boxes, batch, labels, (2, 8, 8), 3, order=order, form=form)
    cuda = boxes_to_masks(boxes.cuda(), batch.cuda(), labels.cuda(), (2, 8, 8), 3, order=order, form=form)
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(box_priority(boxes.cuda(), order, size=(8, 8)).cpu(), box_priority(boxes, order, size=(8, 8)))


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("strategy", ["overlap-small", "overlap-void", "overlap-back-void", "overlap-rate"])
def test_merge_far_corners_cuda_matches_cpu(big, strategy):
    boxes, batch, labels = _boxes(big)
    masks = torch.ones(5, 8, 8, dtype=torch.bool)
    masks[4, :4] = False
    cpu = merge_box_masks(masks, boxes, batch, labels, (2, 8, 8), strategy=strategy)
    cuda = merge_box_masks(
        masks.cuda().transpose(1, 2).contiguous().transpose(1, 2),
        boxes.cuda(),
        batch.cuda(),
        labels.cuda(),
        (2, 8, 8),
        strategy=strategy,
    )
    assert torch.equal(cuda.cpu(), cpu)


def test_background_label_raises_on_cuda():
    boxes, batch, labels = _boxes(1e12)
    labels[1] = 0
    with pytest.raises(ValueError, match=r"boxes_to_masks: box_labels must be object classes .*\[1\] = 0"):
        boxes_to_masks(boxes.cuda(), batch.cuda(), labels.cuda(), (2, 8, 8), 3)
