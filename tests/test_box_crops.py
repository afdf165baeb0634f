"""Single-class box-crop datasets (Box to Tag and Back, Sec. 4.1) on hand-made scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boxloss.data.box_crops import BoxCropDataset, crop_boxes, paste_crop


def _image(H=120, W=140):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3)).astype(np.uint8)


def test_crop_geometry_border_and_void():
    img = _image()
    boxes = np.array([[10.0, 20.0, 80.0, 90.0], [78.0, 30.0, 100.0, 50.0]])  # a class-2 box touches the margin
    crops = crop_boxes(img, boxes, [1, 2], 1, skip_other_classes=False, size=64)
    assert len(crops) == 1
    c = crops[0]
    assert c.window == (17, 7, 93, 83) and c.image.shape == (3, 64, 64)
    # the margin is void where the other box lies (its left edge, x >= 78, in the right margin)
    assert not c.valid[:, -1].all() and c.valid[:, 0].all() and c.border[0].all() and not c.border[32, 32]
    # the crop's centre pixel is the image's centre pixel of the window
    assert torch.allclose(c.image[:, 32, 32] * 255, torch.as_tensor(img[55, 45], dtype=torch.float32), atol=60)


def test_skips_are_counted():
    img = _image()
    boxes = np.array(
        [[10.0, 20.0, 80.0, 90.0], [70.0, 30.0, 100.0, 50.0], [0.0, 0.0, 30.0, 30.0], [5.0, 5.0, 5.0, 60.0]]
    )
    ds = BoxCropDataset([(img, boxes, np.array([1, 2, 1, 1]))], 1)
    assert len(ds) == 0
    assert ds.skipped == {"other-class-overlap": 1, "small": 1, "empty": 1}
    assert "skipped" in repr(ds)
    ds2 = BoxCropDataset([(img, boxes, np.array([1, 2, 1, 1]))], 1, skip_other_classes=False, min_side=20)
    assert len(ds2) == 2 and ds2.skipped == {"empty": 1}


def test_margin_outside_the_image_is_void_and_paste_round_trips():
    img = _image(60, 60)
    crops = crop_boxes(img, np.array([[0.0, 0.0, 55.0, 60.0]]), [3], 3, size=61)
    c = crops[0]
    assert c.window == (-3, -3, 63, 58)
    assert not c.valid[0].any() and not c.valid[:, 0].any()
    pred = torch.zeros(61, 61)
    pred[3:-3, 3:-3] = 1.0
    values, covered = paste_crop(pred, c, (60, 60))
    assert not covered.all() and covered[:, :58].all()
    assert values[30, 30] > 0.9 and values[:, 58:].eq(0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        crop_boxes(np.zeros((4, 4, 3)), np.zeros((0, 4)), [], 1)
    with pytest.raises(ValueError, match="one entry per box"):
        crop_boxes(_image(), np.zeros((2, 4)), [1], 1)
    with pytest.raises(ValueError, match="prediction must be"):
        paste_crop(torch.zeros(3, 4, 4), crop_boxes(_image(), np.array([[0.0, 0, 60, 60]]), [1], 1)[0], (120, 140))
