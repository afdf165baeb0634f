"""Box tensors and merged pseudo labels at the edges of the box convention: infinite and huge corners, boxes
partly or wholly off the map, background labels, layouts and wrongly typed arguments.

The front box is the one with the smaller area *after clipping to the map* (the pixels the convention lets it
cover), so a box with infinite or huge corners ranks as the map it covers and never in front of a small box."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import boxloss
from boxloss.ops.box_masks import box_priority, boxes_to_masks
from boxloss.recipes.pseudo_labels import merge_box_masks
from boxloss.reference.boxes import boxes_to_labels_reference, clipped_box_area

INF = float("inf")
HUGE = [INF, 1e12, 1e30, 2.0**62, 3.4e38]


def _whole_and_small(big, dtype=torch.float64):
    """A whole-image box with far corners (label 1) and a small box inside it (label 2)."""
    boxes = torch.tensor([[-big, -big, big, big], [2.0, 2.0, 5.0, 5.0]], dtype=dtype)
    return boxes, torch.tensor([0, 0]), torch.tensor([1, 2])


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["labels", "onehot"])
@pytest.mark.parametrize("swap", [False, True])
def test_far_corners_never_cover_a_small_box(big, dtype, form, swap):
    boxes, batch, labels = _whole_and_small(big, dtype)
    if swap:  # box order must not matter for "smaller-front"
        boxes, labels = boxes.flip(0), labels.flip(0)
    out = boxes_to_masks(boxes, batch, labels, (1, 8, 8), 2, form=form)
    lab = out if form == "labels" else out.argmax(1)
    assert lab[0, 3, 3] == 2 and lab[0, 2:5, 2:5].eq(2).all()
    assert lab[0, 0, 0] == 1 and lab[0].eq(1).sum() == 64 - 9
    larger = boxes_to_masks(boxes, batch, labels, (1, 8, 8), 2, form="labels", order="larger-front")
    assert larger[0].eq(1).all()


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_priority_is_the_clipped_area_and_never_overflows(big, scale):
    boxes = torch.tensor(
        [
            [0.0, 0.0, big, big],  # clipped to the whole 8 x 8 map
            [-big, -big, big, big],  # the same map
            [0.0, 0.0, 8.0 / scale, 8.0 / scale],  # exactly the map
            [2.0 / scale, 2.0 / scale, 5.0 / scale, 5.0 / scale],  # 9 map pixels
            [0.0, 3.0 / scale, big, 4.0 / scale],  # one full row: 8 map pixels
            [big, big, big, big],  # wholly past the map: area 0
            [-big, -big, -big, -big],  # wholly before the map: area 0
        ],
        dtype=torch.float64,
    )
    pr = box_priority(boxes, spatial_scale=scale, size=(8, 8))
    assert pr.dtype == torch.long
    assert pr[0] == pr[1] == pr[2]
    assert pr[5] == pr[6] < pr[4] < pr[3] < pr[0]
    assert torch.equal(box_priority(boxes, "larger-front", scale, size=(8, 8)), -pr)
    # Without a map size the map is unbounded (clipped at 0 only): far boxes rank largest, without overflow.
    free = box_priority(boxes, spatial_scale=scale)
    assert free[0] == free[1] > free[3] > free[5] == free[6] == 0


def test_priority_orders_as_the_area_and_keeps_exact_ties():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(300, 4, generator=g, dtype=torch.float64) * 40 - 5
    boxes[:, 2:] = boxes[:, :2] + torch.rand(300, 2, generator=g, dtype=torch.float64) * 30
    boxes[::7] = boxes[1::7][: boxes[::7].shape[0]]  # duplicates: exact ties
    area = torch.tensor([clipped_box_area(b, 0.5, 16, 20) for b in boxes.tolist()], dtype=torch.float64)
    pr = box_priority(boxes, spatial_scale=0.5, size=(16, 20))
    i, j = torch.triu_indices(300, 300, 1)
    assert torch.equal(pr[i] < pr[j], area[i] < area[j])
    assert torch.equal(pr[i] == pr[j], area[i] == area[j])


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("strategy", ["overlap-small", "overlap-void", "overlap-rate"])
def test_merge_small_box_in_front_of_far_corners(big, strategy):
    boxes, batch, labels = _whole_and_small(big)
    masks = torch.ones(2, 8, 8, dtype=torch.bool)
    out = merge_box_masks(masks, boxes, batch, labels, (1, 8, 8), strategy=strategy)[0]
    expected = {"overlap-small": 2, "overlap-void": 255, "overlap-rate": 2}[strategy]
    assert out[3, 3] == expected and out[0, 0] == 1


def test_box_priority_bad_input():
    with pytest.raises(TypeError, match="box_priority: boxes must be a floating-point tensor, got torch.bool"):
        box_priority(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"box_priority: boxes must have shape \(K, 4\).*\(4,\)"):
        box_priority(torch.ones(4))
    with pytest.raises(ValueError, match=r"box_priority: boxes must not hold NaN, got boxes\[1\]"):
        box_priority(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, math.nan, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="box_priority: size must be"):
        box_priority(torch.ones(1, 4), size=(0, 3))


# --------------------------------------------------------------------------- background labels


@pytest.mark.parametrize("form", ["onehot", "labels", "union"])
@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("bad", [0, -1, 3])
def test_boxes_to_masks_rejects_labels_that_are_not_object_classes(form, where, bad):
    """Label 0 is the background: a box labelled 0 would paint background inside another box."""
    boxes = torch.tensor([[0.0, 0.0, 6.0, 6.0], [2.0, 2.0, 4.0, 4.0]])
    labels = torch.tensor([1, 1])
    labels[where] = bad
    match = rf"boxes_to_masks: box_labels must be object classes in \[1, 2\].*got box_labels\[{where}\] = {bad}"
    with pytest.raises(ValueError, match=match):
        boxes_to_masks(boxes, torch.tensor([0, 0]), labels, (1, 6, 6), 2, form=form)


def test_boxes_to_masks_compiles_whole_and_still_rejects_background_boxes():
    """The label check reads values, so it is skipped while torch.compile traces; the op then gets label 0 as -1,
    out of its range, and raises at run time."""
    boxes, batch, labels = _whole_and_small(INF)

    def rasterise(b, bb, bl):
        return boxes_to_masks(b, bb, bl, (1, 8, 8), 2, form="labels")

    compiled = torch.compile(rasterise, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(boxes, batch, labels), rasterise(boxes, batch, labels))
    with pytest.raises(Exception, match=r"box_labels must lie in \[0, 3\).*= -1"):
        compiled(boxes, batch, torch.tensor([1, 0]))


# --------------------------------------------------------------------------- merge_box_masks arguments


def _two_boxes():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 5.0]])
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, 2:, 2:] = True
    return masks, boxes, torch.tensor([0, 0]), torch.tensor([1, 2])


@pytest.mark.parametrize("strategy", ["overlap-small", "overlap-void", "overlap-back-void", "overlap-rate"])
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded", "numpy-transposed"])
def test_merge_accepts_any_mask_layout(strategy, layout):
    masks, boxes, batch, labels = _two_boxes()
    expected = merge_box_masks(masks, boxes, batch, labels, (1, 5, 6), strategy=strategy)
    if layout == "transposed":
        other = masks.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        other = torch.zeros(2, 10, 12, dtype=torch.bool)
        other[:, ::2, ::2] = masks
        other = other[:, ::2, ::2]
    elif layout == "expanded":
        masks[1] = masks[0]
        expected = merge_box_masks(masks, boxes, batch, labels, (1, 5, 6), strategy=strategy)
        other = masks[:1].expand(2, 5, 6)
    else:
        other = masks.numpy().transpose(0, 2, 1).copy().transpose(0, 2, 1)
    assert not (isinstance(other, torch.Tensor) and other.is_contiguous())
    assert torch.equal(merge_box_masks(other, boxes, batch, labels, (1, 5, 6), strategy=strategy), expected)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (
            dict(boxes=torch.ones(2, 4, dtype=torch.bool)),
            TypeError,
            "boxes must be a floating-point tensor, got torch.bool",
        ),
        (
            dict(boxes=torch.ones(2, 4, dtype=torch.long)),
            TypeError,
            "boxes must be a floating-point tensor, got torch.int64",
        ),
        (
            dict(boxes=torch.tensor([0.0, 0.0, 4.0, 4.0])),
            ValueError,
            r"boxes must have shape \(K, 4\).*got shape \(4,\)",
        ),
        (dict(boxes=torch.ones(2, 5)), ValueError, r"boxes must have shape \(K, 4\).*got shape \(2, 5\)"),
        (dict(boxes=[[0.0, 0.0, 4.0, 4.0]] * 2), TypeError, "boxes must be a torch.Tensor"),
        (dict(box_batch=torch.tensor([0.0, 0.0])), TypeError, "box_batch must be an int64 tensor"),
        (dict(box_labels=torch.tensor([1])), ValueError, r"box_labels must have shape \(K,\) = \(2,\)"),
        (dict(box_labels=torch.tensor([0, 2])), ValueError, r"box_labels must be object classes.*\[0\] = 0"),
        (
            dict(box_labels=torch.tensor([1, 3]), num_classes=2),
            ValueError,
            r"box_labels must be object classes in \[1, 2\].*\[1\] = 3",
        ),
        (dict(masks=torch.zeros(2, 5, 6)), TypeError, "masks must be bool"),
        (dict(masks=torch.zeros(5, 6, dtype=torch.bool)), ValueError, r"masks must have shape \(K, H, W\)"),
        (dict(masks="x"), TypeError, "masks must be a bool tensor or numpy array"),
        (dict(size=(1, 5)), ValueError, r"size must be \(B, H, W\)"),
        (dict(size=(1, 5, True)), ValueError, r"size must be \(B, H, W\)"),
        (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    ],
)
def test_merge_bad_arguments_name_the_argument(change, exc, match):
    masks, boxes, batch, labels = _two_boxes()
    args = dict(masks=masks, boxes=boxes, box_batch=batch, box_labels=labels, size=(1, 5, 6))
    kwargs = {k: change.pop(k) for k in list(change) if k == "num_classes"}
    args.update(change)
    with pytest.raises(exc, match="merge_box_masks: " + match):
        merge_box_masks(args["masks"], args["boxes"], args["box_batch"], args["box_labels"], args["size"], **kwargs)


# --------------------------------------------------------------------------- fuzzing

# Coordinates a user passes by mistake or at the edges: on the map, off it, infinite, huge, tiny.
_COORD = st.one_of(
    st.integers(-4, 20).map(lambda v: v / 2),
    st.floats(-30, 40, allow_nan=False, width=32),
    st.sampled_from([INF, -INF, 1e12, -1e12, 1e30, -1e30, 3.4e38, 1e-30]),
)


@st.composite
def _box_problems(draw):
    B = draw(st.integers(1, 2))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    L = draw(st.integers(1, 3))
    K = draw(st.integers(0, 6))
    boxes = []
    for _ in range(K):
        x0, x1 = sorted((draw(_COORD), draw(_COORD)))
        y0, y1 = sorted((draw(_COORD), draw(_COORD)))
        boxes.append([x0, y0, x1, y1])
    batch = [draw(st.integers(0, B - 1)) for _ in range(K)]
    labels = [draw(st.integers(1, L)) for _ in range(K)]
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    boxes_t = torch.tensor(boxes, dtype=dtype).reshape(-1, 4)
    return boxes_t, torch.tensor(batch, dtype=torch.long), torch.tensor(labels, dtype=torch.long), B, H, W, L, scale


@given(_box_problems(), st.sampled_from(["smaller-front", "larger-front", "later-front"]))
def test_fuzz_boxes_to_masks_matches_reference_painting(problem, order):
    boxes, batch, labels, B, H, W, L, scale = problem
    out = boxes_to_masks(boxes, batch, labels, (B, H, W), L, spatial_scale=scale, order=order, form="labels")
    ref = boxes_to_labels_reference(boxes, batch, labels, B, H, W, scale, order)
    assert torch.equal(out, ref)
    union = boxes_to_masks(boxes, batch, labels, (B, H, W), L, spatial_scale=scale, form="union")
    assert torch.equal(union[:, 0], ref == 0)
    pr = box_priority(boxes, order, scale, size=(H, W))
    assert pr.dtype == torch.long and pr.shape == (boxes.shape[0],)


@given(_box_problems(), st.sampled_from(["overlap-small", "overlap-void", "overlap-back-void", "overlap-rate"]))
def test_fuzz_merge_of_full_masks_follows_the_front_box(problem, strategy):
    """With every mask full, a pixel's claims are the classes of the boxes covering it: one class gives that class,
    several the strategy's answer; overlap-small gives the front box's class, as boxes_to_masks does."""
    boxes, batch, labels, B, H, W, L, scale = problem
    masks = torch.ones(boxes.shape[0], H, W, dtype=torch.bool)
    out = merge_box_masks(masks, boxes, batch, labels, (B, H, W), strategy=strategy, spatial_scale=scale, num_classes=L)
    union = boxes_to_masks(boxes, batch, labels, (B, H, W), L, spatial_scale=scale, form="union")
    n_classes = union[:, 1:].sum(1)
    front = boxes_to_labels_reference(boxes, batch, labels, B, H, W, scale, "smaller-front")
    single = n_classes == 1
    assert torch.equal(out[single], front[single])
    assert out[n_classes == 0].eq(0).all()
    if strategy == "overlap-small":
        assert torch.equal(out, front)
    elif strategy in ("overlap-void", "overlap-back-void"):
        assert out[n_classes >= 2].eq(255).all()


def test_public_names():
    assert boxloss.box_priority is box_priority and boxloss.merge_box_masks is merge_box_masks


@given(_box_problems(), st.data())
def test_fuzz_nan_anywhere_in_the_boxes_raises_naming_the_box(problem, data):
    boxes, batch, labels, B, H, W, L, scale = problem
    if boxes.shape[0] == 0:
        return
    k = data.draw(st.integers(0, boxes.shape[0] - 1))
    c = data.draw(st.integers(0, 3))
    boxes = boxes.clone()
    boxes[k, c] = math.nan
    match = rf"boxes must not hold NaN, got boxes\[{k}\]"
    with pytest.raises(ValueError, match="boxes_to_masks: " + match):
        boxes_to_masks(boxes, batch, labels, (B, H, W), L, spatial_scale=scale)
    with pytest.raises(ValueError, match="box_priority: " + match):
        box_priority(boxes, spatial_scale=scale, size=(H, W))
    masks = torch.ones(boxes.shape[0], H, W, dtype=torch.bool)
    with pytest.raises(ValueError, match="merge_box_masks: " + match):
        merge_box_masks(masks, boxes, batch, labels, (B, H, W), spatial_scale=scale, num_classes=L)


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_bad_spatial_scale_raises(scale):
    boxes, batch, labels = _whole_and_small(INF)
    match = "spatial_scale must be a positive finite number"
    with pytest.raises(ValueError, match="boxes_to_masks: " + match):
        boxes_to_masks(boxes, batch, labels, (1, 8, 8), 2, spatial_scale=scale)
    with pytest.raises(ValueError, match="box_priority: " + match):
        box_priority(boxes, spatial_scale=scale)
    with pytest.raises(ValueError, match="merge_box_masks: " + match):
        merge_box_masks(torch.ones(2, 8, 8, dtype=torch.bool), boxes, batch, labels, (1, 8, 8), spatial_scale=scale)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(box=[3.0, 0.0, 1.0, 4.0]), r"boxes must have x1 >= x0 and y1 >= y0, got boxes\[1\]"),
        (dict(batch=[0, 1]), r"box_batch must lie in \[0, 1\), got box_batch\[1\] = 1"),
        (dict(batch=[-1, 0]), r"box_batch must lie in \[0, 1\), got box_batch\[0\] = -1"),
    ],
)
def test_bad_box_values_name_the_public_function(change, match):
    boxes, batch, labels = _whole_and_small(1e12)
    if "box" in change:
        boxes[1] = torch.tensor(change["box"], dtype=boxes.dtype)
    if "batch" in change:
        batch = torch.tensor(change["batch"])
    with pytest.raises(ValueError, match="boxes_to_masks: " + match):
        boxes_to_masks(boxes, batch, labels, (1, 8, 8), 2)
    with pytest.raises(ValueError, match="merge_box_masks: " + match):
        merge_box_masks(torch.ones(2, 8, 8, dtype=torch.bool), boxes, batch, labels, (1, 8, 8))


@pytest.mark.parametrize("module", ["boxloss.ops.boxes", "boxloss.ops.box_masks", "boxloss.recipes.pseudo_labels"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch}, verbose=False)
    assert result.attempted > 0 and result.failed == 0
