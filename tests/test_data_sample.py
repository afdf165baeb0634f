"""The one sample form and the packed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boxloss.data import Sample, collate_samples
from boxloss.data.sample import boxes_from_instances
from boxloss.ops.boxes import box_pixel_ranges


def _sample(h, w, boxes, labels, mask=True, image_id="s", **kw):
    image = np.full((h, w, 3), 255, np.uint8)
    m = np.full((h, w), 1, np.uint8) if mask else None
    return Sample(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), m, image_id, **kw)


def test_collate_packs_boxes_pads_images_and_sums_counters():
    a = _sample(4, 6, [[0, 0, 2, 2], [1, 1, 6, 4]], [1, 3], image_id="a", info={"boxes_dropped": 2})
    b = _sample(5, 3, [], [], mask=False, image_id="b")
    c = _sample(
        2,
        2,
        [[0, 0, 1, 1]],
        [2],
        image_id="c",
        valid=np.array([[True, False], [True, True]]),
        info={"boxes_clipped": 1},
    )
    batch = collate_samples([a, b, c])
    assert batch.images.shape == (3, 3, 5, 6) and batch.images.dtype == torch.float32
    assert batch.images[0, :, :4, :6].eq(1).all() and batch.images[0, :, 4:].eq(0).all()
    assert batch.box_batch.tolist() == [0, 0, 2] and batch.box_labels.tolist() == [1, 3, 2]
    assert batch.boxes.tolist() == [[0, 0, 2, 2], [1, 1, 6, 4], [0, 0, 1, 1]]
    assert batch.boxes.dtype == torch.float32 and batch.box_batch.dtype == torch.int64
    assert batch.has_mask.tolist() == [True, False, True]
    assert batch.masks.dtype == torch.int64 and batch.masks[1].eq(255).all() and batch.masks[0, 4:].eq(255).all()
    assert batch.masks[0, :4, :6].eq(1).all()
    assert batch.valid[0].sum() == 24 and batch.valid[1].sum() == 15 and batch.valid[2].sum() == 3
    assert not batch.valid[2, 0, 1]
    assert batch.image_ids == ["a", "b", "c"] and batch.boxes_dropped == 2 and batch.boxes_clipped == 1
    assert batch.to("cpu").boxes.equal(batch.boxes)
    assert collate_samples([b]).masks is None


def test_collate_rejects_bad_input_naming_the_sample():
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])
    with pytest.raises(TypeError, match="element 0 is a dict"):
        collate_samples([{"image": 1}])
    bad = _sample(4, 4, [[0, 0, 2, 2]], [1], image_id="oops")
    bad.mask = bad.mask.astype(np.int64)
    with pytest.raises(TypeError, match=r"sample 0 \(oops\): mask must be a \(4, 4\) uint8"):
        collate_samples([bad])


@pytest.mark.parametrize(
    "edit, exc, match",
    [
        (lambda s: setattr(s, "image", s.image[..., :2]), TypeError, "image must be a"),
        (lambda s: setattr(s, "boxes", s.boxes.astype(np.float64)), TypeError, "boxes must be a"),
        (lambda s: setattr(s, "labels", s.labels.astype(np.int32)), TypeError, "labels must be a"),
        (lambda s: setattr(s, "labels", np.array([0], np.int64)), ValueError, "class channels"),
        (lambda s: setattr(s, "boxes", np.array([[2, 0, 1, 2]], np.float32)), ValueError, "x1 > x0"),
        (lambda s: setattr(s, "boxes", np.array([[0, 0, np.nan, 2]], np.float32)), ValueError, "finite"),
        (lambda s: setattr(s, "valid", np.ones((3, 4), bool)), TypeError, "valid must be"),
        (lambda s: setattr(s, "instances", np.full((4, 4), 2, np.int32)), ValueError, "refers to box 1"),
    ],
)
def test_sample_check_names_the_field(edit, exc, match):
    s = _sample(4, 4, [[0, 0, 2, 2]], [1])
    s.check()
    edit(s)
    with pytest.raises(exc, match=match):
        s.check("here")


def test_box_helpers():
    inst = np.zeros((5, 7), np.int32)
    inst[1:3, 2:5] = 1
    inst[4, 6] = 3
    out = boxes_from_instances(inst, 3)
    assert out[0].tolist() == [2, 1, 5, 3] and np.isnan(out[1]).all() and out[2].tolist() == [6, 4, 7, 5]
    assert box_pixel_ranges((2, 1, 5, 3), 5, 7) == (1, 3, 2, 5)
    # No pixel centre j + 0.5 in [1.6, 2.4): the box covers its midpoint's column, as in every box op.
    assert box_pixel_ranges((1.6, 0.4, 2.4, 9), 5, 7) == (0, 5, 2, 3)
    assert box_pixel_ranges((-3, -3, 100, 100), 5, 7) == (0, 5, 0, 7)
