"""Pseudo labels (BANA's, and the DenseCRF baseline's) on inputs a user passes by mistake: NaN or Inf in a float
argument, an empty image or feature map, boxes with infinite corners, bad CRF settings.  Non-finite inputs raise
instead of returning label maps (the arg-max of NaN is a label all the same) or crashing pydensecrf; infinite box
corners are clipped like any other."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import boxloss

pytest.importorskip("pydensecrf")


def _inputs(H=24, W=32, stride=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = np.zeros((H, W, 3), np.uint8)
    image[...] = (40, 120, 40)
    image[6:18, 8:24] = (220, 40, 40)
    h, w = H // stride, W // stride
    features = torch.randn(4, h, w, generator=g)
    features[3, 6 // stride : 18 // stride, 8 // stride : 24 // stride] += 3
    weight = torch.zeros(3, 4)  # (L + 1, D): class 1 reads feature 3, class 2 feature 0
    weight[1, 3], weight[2, 0] = 2.0, 1.0
    boxes = torch.tensor([[6.0, 4.0, 26.0, 20.0], [0.0, 0.0, 10.0, 10.0]])
    labels = torch.tensor([1, 2])
    return image, features, weight, boxes, labels


def _call(image, features, weight, boxes, labels, **kw):
    return boxloss.bana_pseudo_labels(image, features, weight, boxes, labels, **kw)


def test_clean_inputs_give_labels():
    out = _call(*_inputs())
    assert out.y_crf.shape == out.y_ret.shape == (24, 32)


@pytest.mark.parametrize("name", ["features", "classifier_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_float_arguments_raise(name, value, where, dtype):
    image, features, weight, boxes, labels = _inputs()
    features, weight = features.to(dtype), weight.to(dtype)
    t = features if name == "features" else weight
    flat = t.view(-1)
    flat[0 if where == "first" else -1] = value
    with pytest.raises(ValueError, match=rf"bana_pseudo_labels: {name} must be finite, got {value}"):
        _call(image, features, weight, boxes, labels)


def test_values_beyond_float32_raise():
    image, features, weight, boxes, labels = _inputs()
    features = features.double()
    features[0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="features must be finite after conversion to float32"):
        _call(image, features, weight, boxes, labels)
    image, features, weight, boxes, labels = _inputs()
    features[3] = 1e30
    weight[:, 3] = 1e30
    with pytest.raises(ValueError, match="class activation maps .* overflow float32"):
        _call(image, features, weight, boxes, labels)


@pytest.mark.parametrize("shape", [(0, 32, 3), (24, 0, 3), (0, 0, 3)])
def test_empty_image_raises(shape):
    _, features, weight, boxes, labels = _inputs()
    with pytest.raises(ValueError, match=r"bana_pseudo_labels: image must have at least one row and one column"):
        _call(np.zeros(shape, np.uint8), features, weight, boxes, labels)


@pytest.mark.parametrize("shape", [(4, 0, 8), (4, 6, 0), (0, 6, 8)])
def test_empty_features_raise(shape):
    image, _, weight, boxes, labels = _inputs()
    with pytest.raises(ValueError, match="bana_pseudo_labels: features must be non-empty"):
        _call(image, torch.zeros(shape), weight, boxes, labels)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(features=torch.zeros(4, 6, 8, dtype=torch.long)), TypeError, "features must be float"),
        (dict(classifier_weight=torch.zeros(3, 4, dtype=torch.long)), TypeError, "classifier_weight must be float"),
        (dict(classifier_weight=torch.zeros(1, 4)), ValueError, r"classifier_weight must have shape \(L \+ 1, D\)"),
        (dict(classifier_weight=torch.zeros(3, 5)), ValueError, r"classifier_weight must have shape \(L \+ 1, D\)"),
        (
            dict(boxes=torch.tensor([[0.0, math.nan, 4.0, 4.0], [0.0, 0.0, 1.0, 1.0]])),
            ValueError,
            "boxes must not hold NaN",
        ),
        (dict(boxes=torch.ones(2, 4, dtype=torch.bool)), TypeError, "boxes must hold real numbers"),
        (dict(boxes=torch.ones(2, 5)), ValueError, r"boxes must have shape \(K, 4\)"),
        (dict(crf={"iterations": -1}), ValueError, r"crf\['iterations'\] must be a whole number"),
        (dict(crf={"bilateral_xy": math.nan}), ValueError, r"crf\['bilateral_xy'\] must be a positive finite"),
        (dict(crf={"gaussian_weight": math.inf}), ValueError, r"crf\['gaussian_weight'\] must be a positive finite"),
        (dict(bg_threshold=math.nan), ValueError, r"bg_threshold must be a number in \[0, 1\]"),
        (dict(bg_threshold=1.5), ValueError, r"bg_threshold must be a number in \[0, 1\]"),
    ],
)
def test_bad_arguments_name_the_argument(change, exc, match):
    image, features, weight, boxes, labels = _inputs()
    args = dict(features=features, classifier_weight=weight, boxes=boxes)
    kwargs = {k: change.pop(k) for k in list(change) if k in ("crf", "bg_threshold")}
    args.update(change)
    with pytest.raises(exc, match="bana_pseudo_labels: " + match):
        _call(image, args["features"], args["classifier_weight"], args["boxes"], labels, **kwargs)


@pytest.mark.parametrize("big", [math.inf, 1e12, 1e30])
def test_infinite_box_corners_are_clipped(big):
    image, features, weight, _, _ = _inputs()
    far = _call(image, features, weight, torch.tensor([[-big, -big, big, big]]), torch.tensor([1]))
    whole = _call(image, features, weight, torch.tensor([[0.0, 0.0, 32.0, 24.0]]), torch.tensor([1]))
    assert torch.equal(far.y_crf, whole.y_crf) and torch.equal(far.y_ret, whole.y_ret)


@given(
    st.sampled_from(["features", "classifier_weight"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(0, 2**31),
)
def test_fuzz_one_non_finite_value_anywhere_raises(name, value, seed):
    image, features, weight, boxes, labels = _inputs()
    t = features if name == "features" else weight
    i = int(torch.randint(0, t.numel(), (1,), generator=torch.Generator().manual_seed(seed)))
    t.view(-1)[i] = value
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        _call(image, features, weight, boxes, labels)


@pytest.mark.parametrize(
    "setting",
    ["gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_dense_crf_baseline_rejects_bad_settings(setting, value):
    """A NaN kernel width crashes the process inside pydensecrf, so it must never get there."""
    from boxloss.recipes.baselines import dense_crf_box_masks

    image, *_ = _inputs()
    with pytest.raises(ValueError, match=f"dense_crf_box_masks: {setting} must be a positive finite number"):
        dense_crf_box_masks(image, np.array([[6.0, 4.0, 26.0, 20.0]]), [1], 2, **{setting: value})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(box_confidence=math.nan), "box_confidence must be a probability"),
        (dict(outside_confidence=1.0), "outside_confidence must be a probability"),
        (dict(iterations=-1), "iterations must be an int >= 0"),
    ],
)
def test_dense_crf_baseline_rejects_bad_confidences(kwargs, match):
    from boxloss.recipes.baselines import dense_crf_box_masks

    image, *_ = _inputs()
    with pytest.raises(ValueError, match="dense_crf_box_masks: " + match):
        dense_crf_box_masks(image, np.array([[6.0, 4.0, 26.0, 20.0]]), [1], 2, **kwargs)
