"""Transforms keep image, mask, instances, valid pixels and boxes consistent (property tests with hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from boxloss.data import Sample, SyntheticBoxDataset, SyntheticConfig, boxes_from_instances, collate_samples
from boxloss.data.transforms import (
    ColorJitter,
    Compose,
    Pad,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    crop,
    hflip,
    pad,
    resize,
)
from data_builders import scene


@st.composite
def scenes(draw):
    h, w = draw(st.integers(2, 20)), draw(st.integers(2, 20))
    rects = []
    for _ in range(draw(st.integers(0, 5))):
        t = draw(st.integers(0, h - 1))
        left = draw(st.integers(0, w - 1))
        rects.append((draw(st.integers(1, 4)), t, left, draw(st.integers(t + 1, h)), draw(st.integers(left + 1, w))))
    return scene(h, w, rects, holes=draw(st.booleans()))


EXACT_OPS = st.one_of(
    st.tuples(st.just("crop"), st.integers(-8, 24), st.integers(-8, 24), st.integers(1, 24), st.integers(1, 24)),
    st.tuples(st.just("flip")),
    st.tuples(st.just("pad"), st.integers(0, 6), st.integers(0, 6)),
)


def _apply(s: Sample, op) -> Sample:
    if op[0] == "crop":
        return crop(s, *op[1:], fill=(1, 2, 3))
    if op[0] == "flip":
        return hflip(s)
    return pad(s, s.height + op[1], s.width + op[2], fill=(1, 2, 3))


def _check_aligned(s: Sample) -> None:
    s.check()
    valid = np.ones(s.mask.shape, bool) if s.valid is None else s.valid
    lut = np.concatenate([[0], s.labels]).astype(np.uint8)
    np.testing.assert_array_equal(s.mask[valid], lut[s.instances][valid])  # labels still match their objects
    assert (s.mask[~valid] == 255).all() and (s.instances[~valid] == 0).all()
    np.testing.assert_array_equal(s.image[..., 0][valid], s.mask[valid])  # the image moved with the mask
    assert (s.image[~valid] == (1, 2, 3)).all()


@given(scenes(), st.lists(EXACT_OPS, max_size=4))
def test_crop_flip_pad_keep_boxes_tight_and_fields_aligned(sample, ops):
    k0 = sample.num_boxes
    s = sample
    for op in ops:
        s = _apply(s, op)
    _check_aligned(s)
    # every kept box is exactly the tight box around its object's remaining pixels
    np.testing.assert_array_equal(s.boxes, boxes_from_instances(s.instances, s.num_boxes))
    assert s.info.get("boxes_dropped", 0) == k0 - s.num_boxes
    assert s.info.get("boxes_clipped", 0) <= len(ops) * k0


@given(scenes(), st.integers(1, 40), st.integers(1, 40))
def test_resize_scales_boxes_within_half_a_pixel_of_the_objects(sample, out_h, out_w):
    s = resize(sample, out_h, out_w)
    s.check()
    assert s.image.shape == (out_h, out_w, 3)
    sx, sy = out_w / sample.width, out_h / sample.height
    np.testing.assert_allclose(s.boxes, sample.boxes * np.array([sx, sy, sx, sy], np.float32), rtol=1e-6)
    tight = boxes_from_instances(s.instances, s.num_boxes)
    present = ~np.isnan(tight).any(axis=1)
    eps = 1e-4
    # any scale: an object's resized pixels lie inside its scaled box grown by half a pixel
    assert (tight[present, :2] >= s.boxes[present, :2] - 0.5 - eps).all()
    assert (tight[present, 2:] <= s.boxes[present, 2:] + 0.5 + eps).all()
    if sx >= 1 and sy >= 1:  # upscaling keeps every object, and the box stays within half a pixel of tight
        assert present.all()
        assert np.abs(tight - s.boxes).max(initial=0) <= 0.5 + eps
    lut = np.concatenate([[0], s.labels]).astype(np.uint8)
    np.testing.assert_array_equal(s.mask, lut[s.instances])


def test_crop_retightens_a_non_convex_object_when_instances_are_known():
    # an L shape: the crop keeps only its vertical bar, although its box spans the whole crop width
    s = scene(10, 10, [(1, 0, 0, 10, 2), (1, 8, 0, 10, 10)])
    s = Sample(
        s.image,
        np.array([[0, 0, 10, 10]], np.float32),
        np.array([1]),
        s.mask,
        "L",
        np.where(s.instances > 0, 1, 0).astype(np.int32),
    )
    c = crop(s, 0, 0, 6, 8)
    np.testing.assert_array_equal(c.boxes, [[0, 0, 2, 6]])
    assert c.info == {"boxes_clipped": 1}
    # without instances the box can only be clipped geometrically
    g = crop(Sample(s.image, s.boxes, s.labels, s.mask, "L"), 0, 0, 6, 8)
    np.testing.assert_array_equal(g.boxes, [[0, 0, 8, 6]])


def test_crop_drops_boxes_that_leave_the_window_and_counts_them():
    s = scene(12, 12, [(1, 0, 0, 3, 3), (2, 6, 6, 12, 12), (3, 0, 8, 2, 12)])
    c = crop(s, 5, 4, 7, 8)
    np.testing.assert_array_equal(c.labels, [2])
    np.testing.assert_array_equal(c.boxes, [[2, 1, 8, 7]])
    assert c.info == {"boxes_dropped": 2}
    assert set(np.unique(c.instances)) == {0, 1}
    no_inst = crop(Sample(s.image, s.boxes, s.labels, s.mask, "x"), 5, 4, 7, 8)
    np.testing.assert_array_equal(no_inst.labels, [2])
    assert no_inst.info == {"boxes_dropped": 2}
    sliver = crop(Sample(s.image, np.array([[0, 0, 4.5, 3]], np.float32), np.array([1]), s.mask, "x"), 0, 4, 5, 5)
    assert sliver.num_boxes == 0 and sliver.info == {"boxes_dropped": 1}  # 0.5 px wide: under min_size


def test_flip_formula_and_involution():
    s = scene(6, 10, [(1, 1, 2, 4, 5)])
    f = hflip(s)
    np.testing.assert_array_equal(f.boxes, [[5, 1, 8, 4]])  # x0' = W - x1, x1' = W - x0
    ff = hflip(f)
    for name in ("image", "mask", "instances", "boxes"):
        np.testing.assert_array_equal(getattr(ff, name), getattr(s, name))


def test_pad_to_divisor_marks_padding_invalid_and_void():
    s = scene(5, 7, [(1, 0, 0, 5, 7)])
    p = pad(s, divisor=4)
    assert p.image.shape == (8, 8, 3) and p.valid.sum() == 35
    assert (p.mask[5:] == 255).all() and (p.mask[:, 7:] == 255).all()
    np.testing.assert_array_equal(p.boxes, s.boxes)
    assert pad(s, 5, 7) is s
    assert Pad((6, 9))(s).image.shape == (6, 9, 3)
    with pytest.raises(ValueError, match="divisor"):
        pad(s, divisor=0)


def test_color_jitter_changes_only_the_image_and_follows_the_generator():
    s = SyntheticBoxDataset("train", 1, SyntheticConfig(image_size=32), cache=False)[0]
    j = ColorJitter(0.4, 0.4, 0.4)
    a, b = j(s, np.random.default_rng(1)), j(s, np.random.default_rng(1))
    np.testing.assert_array_equal(a.image, b.image)
    assert (a.image != s.image).any()
    for name in ("mask", "instances", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(s, name))
    np.testing.assert_array_equal(ColorJitter(0, 0, 0)(s, np.random.default_rng(0)).image, s.image)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=1.5)


def test_random_crop_pads_small_images_and_random_scale_resizes():
    s = scene(5, 7, [(1, 1, 1, 4, 4)])
    c = RandomCrop((8, 6))(s, np.random.default_rng(0))
    assert c.image.shape == (8, 6, 3) and not c.valid[5:].any()
    r = RandomScale(2.0, 2.0)(s, np.random.default_rng(0))
    assert r.image.shape == (10, 14, 3)
    np.testing.assert_array_equal(r.boxes, s.boxes * 2)
    assert RandomHorizontalFlip(1.0)(s, np.random.default_rng(0)).boxes[0, 0] == 3
    for bad in (lambda: RandomScale(2, 1), lambda: RandomCrop(0), lambda: RandomHorizontalFlip(2)):
        with pytest.raises(ValueError):
            bad()


def test_compose_draws_from_torch_rng_so_workers_and_seeds_differ():
    s = SyntheticBoxDataset("train", 1, SyntheticConfig(image_size=48), cache=False)[0]
    aug = Compose([RandomScale(0.5, 1.5), RandomCrop(32), RandomHorizontalFlip(), ColorJitter()])
    torch.manual_seed(3)
    a = aug(s)
    torch.manual_seed(3)
    b = aug(s)
    torch.manual_seed(4)
    c = aug(s)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, c.image)


def test_transformed_dataset_through_a_dataloader():
    aug = Compose([RandomScale(0.5, 2.0), RandomCrop(40), RandomHorizontalFlip()])
    ds = SyntheticBoxDataset("train", 8, SyntheticConfig(image_size=48), cache=False, transform=aug)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    total = 0
    for batch in loader:
        assert batch.images.shape == (4, 3, 40, 40) and batch.valid.shape == (4, 40, 40)
        assert batch.boxes.shape[0] == batch.box_batch.shape[0] == batch.box_labels.shape[0]
        assert batch.boxes_dropped >= 0
        total += batch.boxes.shape[0] + batch.boxes_dropped
    assert total == sum(ds.load(i).num_boxes for i in range(8))
