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


def test_crop_carries_its_box_and_true_mask():
    img = _image()
    mask = np.zeros((120, 140), np.uint8)
    mask[30:60, 20:50] = 1  # the object of class 1
    mask[60:62, 20:50] = 255  # a void band
    mask[0:10, 0:10] = 2  # another class outside the window
    crops = crop_boxes(img, np.array([[20.0, 30.0, 50.0, 60.0]]), [1], 1, size=60, min_side=0, mask=mask)
    (c,) = crops
    # the window is the 30 x 30 box plus a 3-pixel margin: 36 pixels -> 60, so the box is [5, 55) in crop pixels
    assert torch.allclose(c.box, torch.tensor([5.0, 5.0, 55.0, 55.0]))
    assert c.mask.dtype == torch.uint8 and c.mask.shape == (60, 60)
    assert set(torch.unique(c.mask).tolist()) == {0, 1, 255}
    inside = c.mask[6:54, 6:54]
    assert (inside == 1).all()  # the object fills this box
    assert (c.mask[:4] == 0).all()  # the margin above the box is background
    assert (c.mask[-2:] == 255).any()  # the void band below the box


def test_collate_crops_stacks_every_field():
    from boxloss.data import collate_crops

    img = _image()
    mask = np.zeros((120, 140), np.uint8)
    crops = crop_boxes(
        img, np.array([[10.0, 20.0, 80.0, 90.0], [90.0, 5.0, 130.0, 40.0]]), [1, 1], 1, size=32, min_side=0, mask=mask
    )
    batch = collate_crops(crops)
    assert batch.images.shape == (2, 3, 32, 32) and batch.boxes.shape == (2, 4) and batch.masks.shape == (2, 32, 32)
    assert batch.labels.tolist() == [1, 1] and batch.box_index.tolist() == [0, 1]
    no_mask = crop_boxes(img, np.array([[10.0, 20.0, 80.0, 90.0]]), [1], 1, size=32)
    assert collate_crops(no_mask).masks is None
    with pytest.raises(ValueError, match="one size"):
        collate_crops(crops + crop_boxes(img, np.array([[10.0, 20.0, 80.0, 90.0]]), [1], 1, size=16))
    with pytest.raises(ValueError, match="empty"):
        collate_crops([])
    loader = torch.utils.data.DataLoader(crops, batch_size=2, collate_fn=collate_crops)
    assert next(iter(loader)).images.shape == (2, 3, 32, 32)


def test_crops_are_reachable_after_import_boxloss():
    import boxloss

    assert boxloss.data.collate_crops is not None and boxloss.data.BoxCrop is not None
