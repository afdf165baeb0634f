"""boxloss box priors (the fused row/column-max primitive and the losses on it)
on the CPU kernels against the loop-over-boxes reference."""

from __future__ import annotations

import zlib

import pytest
import torch

import boxloss
from box_inputs import make_boxes, make_probs
from boxloss.ops.boxes import box_pixel_ranges as box_ranges
from boxloss.reference.box_priors import (
    box_row_col_max_reference,
    mil_box_loss_reference,
    projection_loss_reference,
    tight_box_loss_reference,
)
from boxloss.reference.boxes import box_pixel_ranges

OP = torch.ops.boxloss.box_row_col_max.default
OP_BACKWARD = torch.ops.boxloss._box_row_col_max_backward.default

LOSSES = {
    "tight_either": (
        lambda *a, **k: boxloss.tight_box_loss(*a, mode="either", **k),
        lambda *a, **k: tight_box_loss_reference(*a, mode="either", **k),
    ),
    "tight_both": (
        lambda *a, **k: boxloss.tight_box_loss(*a, mode="both", **k),
        lambda *a, **k: tight_box_loss_reference(*a, mode="both", **k),
    ),
    "mil": (boxloss.mil_box_loss, mil_box_loss_reference),
    "mil_present_no_bg": (
        lambda *a, **k: boxloss.mil_box_loss(*a, negatives="present", background_channel=None, **k),
        lambda *a, **k: mil_box_loss_reference(*a, negatives="present", background_channel=None, **k),
    ),
    "projection": (boxloss.projection_loss, projection_loss_reference),
}

# (B, C, H, W, boxes per image, spatial_scale): the map is (H, W); boxes are drawn
# in image pixels (H / scale, W / scale).
CASES = [
    (1, 1, 1, 1, 1, 1.0),
    (2, 3, 7, 9, 3, 1.0),
    (3, 4, 16, 12, 5, 0.5),
    (2, 21, 13, 11, 8, 0.125),
    (1, 2, 1, 33, 4, 1.0),
    (2, 2, 30, 1, 4, 1.0),
]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _inputs(case, **kw):
    B, C, H, W, n, scale = case
    probs = make_probs(B, C, H, W, seed=_seed(case), **kw)
    boxes, batch, labels = make_boxes(B, C, H / scale, W / scale, n, seed=_seed(case, "boxes"))
    return probs, boxes, batch, labels, scale


def _value_and_grad(fn, probs, *args, **kwargs):
    x = probs.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    if out.requires_grad:
        (out.sum() if out.dim() else out).backward()
    return out.detach(), (x.grad if x.grad is not None else torch.zeros_like(x))


def test_compiled_ops_are_loaded():
    assert boxloss.extension_loaded(), boxloss.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("boxloss::box_row_col_max", "CPU")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_primitive_matches_reference(case):
    probs, boxes, batch, labels, scale = _inputs(case)
    x = probs.clone().requires_grad_()
    row_max, col_max, row_index, col_index, ranges = OP(x, boxes, batch, labels, scale)
    ref_row, ref_col, ref_ranges = box_row_col_max_reference(probs, boxes, batch, labels, scale)
    assert torch.equal(ranges, ref_ranges)
    torch.testing.assert_close(row_max, ref_row, rtol=0, atol=0)
    torch.testing.assert_close(col_max, ref_col, rtol=0, atol=0)
    g_row, g_col = torch.rand_like(row_max), torch.rand_like(col_max)
    (grad,) = torch.autograd.grad((row_max * g_row).sum() + (col_max * g_col).sum(), x)
    xr = probs.clone().requires_grad_()
    rr, rc, _ = box_row_col_max_reference(xr, boxes, batch, labels, scale)
    (ref_grad,) = torch.autograd.grad((rr * g_row).sum() + (rc * g_col).sum(), xr)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("levels", [2, 3])
def test_ties_go_to_the_lowest_index(levels):
    probs, boxes, batch, labels, scale = _inputs((2, 3, 12, 14, 6, 1.0), levels=levels)
    x = probs.clone().requires_grad_()
    out = OP(x, boxes, batch, labels, scale)
    ref = box_row_col_max_reference(x, boxes, batch, labels, scale)  # argmax: the first maximum
    (g,) = torch.autograd.grad(out[0].sum() + 2 * out[1].sum(), x)
    (g_ref,) = torch.autograd.grad(ref[0].sum() + 2 * ref[1].sum(), x)
    assert torch.equal(g, g_ref)
    # and the index of each row maximum is the leftmost among equal values
    for k in range(boxes.shape[0]):
        r0, r1, c0, c1 = out[4][k].tolist()
        for r in range(r0, r1):
            flat = out[2][k, r].item()
            plane = probs[batch[k], labels[k], r, c0:c1]
            assert flat % probs.shape[3] == c0 + int((plane == plane.max()).nonzero()[0])


def test_packed_layout_and_empty_count():
    probs, boxes, batch, labels, scale = _inputs((2, 3, 10, 12, 3, 1.0))
    out = boxloss.box_row_col_max(probs, boxes, batch, labels, spatial_scale=scale)
    dense = boxloss.box_row_col_max(probs, boxes, batch, labels, spatial_scale=scale, layout="dense")
    assert out.num_empty == 2  # the zero-width box and the box outside the image (make_boxes)
    assert out.empty.tolist() == [(r[1] <= r[0]) for r in out.ranges.tolist()]
    for k in range(boxes.shape[0]):
        rows, cols = box_pixel_ranges(boxes[k].tolist(), scale, 10, 12)
        assert out.row_offsets[k + 1] - out.row_offsets[k] == len(rows)
        assert out.col_offsets[k + 1] - out.col_offsets[k] == len(cols)
        torch.testing.assert_close(
            out.row_max[out.row_offsets[k] : out.row_offsets[k + 1]],
            dense.row_max[k, rows.start : rows.stop],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            out.col_max[out.col_offsets[k] : out.col_offsets[k + 1]],
            dense.col_max[k, cols.start : cols.stop],
            rtol=0,
            atol=0,
        )
    assert dense.row_offsets is None and dense.row_max.shape == (boxes.shape[0], 10)


@pytest.mark.parametrize(
    "box, scale, size, expected",
    [
        ((2.0, 3.0, 5.0, 7.0), 1.0, (10, 10), (range(3, 7), range(2, 5))),  # tight box of rows 3..6, cols 2..4
        ((0.0, 0.0, 8.0, 8.0), 0.125, (1, 1), (range(0, 1), range(0, 1))),
        ((3.0, 3.0, 5.0, 5.0), 0.125, (4, 4), (range(0, 1), range(0, 1))),  # narrower than a map pixel
        ((1.0, 1.0, 1.0, 4.0), 1.0, (5, 5), (range(0), range(0))),  # zero width
        ((-3.0, -3.0, 2.0, 2.0), 1.0, (5, 5), (range(0, 2), range(0, 2))),  # clipped
        ((0.0, 0.0, float("inf"), float("inf")), 0.5, (3, 4), (range(0, 3), range(0, 4))),
        ((5.0, 0.0, 9.0, 3.0), 1.0, (4, 5), (range(0), range(0))),  # right of the map
        ((1.4, 0.2, 2.6, 0.8), 1.0, (2, 4), (range(0, 1), range(1, 3))),  # centres 1.5, 2.5 inside x
    ],
)
def test_box_convention(box, scale, size, expected):
    H, W = size
    assert box_pixel_ranges(box, scale, H, W) == expected
    probs = make_probs(1, 1, H, W, seed=1)
    _, _, _, _, ranges = OP(
        probs, torch.tensor([box], dtype=torch.float64), torch.tensor([0]), torch.tensor([0]), scale
    )
    rows, cols = expected
    want = [rows.start, rows.stop, cols.start, cols.stop] if len(rows) else [0, 0, 0, 0]
    assert ranges[0].tolist() == want
    # The host-side closed form that datasets, box crops and baselines use.
    assert list(box_ranges(box, H, W, spatial_scale=scale)) == want


def test_host_box_ranges_match_the_enumeration():
    g = torch.Generator().manual_seed(3)
    for _ in range(2000):
        H, W = (int(v) for v in torch.randint(1, 12, (2,), generator=g))
        scale = [1.0, 0.5, 0.125, 1 / 3][int(torch.randint(0, 4, (1,), generator=g))]
        lo = (torch.rand(2, generator=g) * 1.4 - 0.2) * torch.tensor([W, H]) / scale
        size = torch.rand(2, generator=g) * torch.tensor([W, H]) / scale * (torch.rand(1, generator=g) < 0.8)
        box = torch.cat([lo, lo + size]).tolist()
        rows, cols = box_pixel_ranges(box, scale, H, W)
        want = [rows.start, rows.stop, cols.start, cols.stop] if len(rows) else [0, 0, 0, 0]
        assert list(box_ranges(box, H, W, spatial_scale=scale)) == want, (box, scale, H, W)
    with pytest.raises(ValueError, match="NaN"):
        box_ranges((0.0, float("nan"), 1.0, 1.0), 4, 4)
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_ranges((2.0, 0.0, 1.0, 1.0), 4, 4)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_losses_match_reference_float64(name, case, reduction):
    fast, reference = LOSSES[name]
    probs, boxes, batch, labels, scale = _inputs(case, softmax=True)
    value, grad = _value_and_grad(fast, probs, boxes, batch, labels, spatial_scale=scale, reduction=reduction)
    ref_value, ref_grad = _value_and_grad(
        reference, probs, boxes, batch, labels, spatial_scale=scale, reduction=reduction
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_tight_box_loss_by_hand():
    # One 2x3 box: row maxima 0.5 and 1.0 (mean 0.75), column maxima 0.2, 1.0, 0.4 (mean 8/15).
    x = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    x[0, 0, 1, 1:4] = torch.tensor([0.2, 0.5, 0.1])
    x[0, 0, 2, 1:4] = torch.tensor([0.1, 1.0, 0.4])
    args = (x, torch.tensor([[1.0, 1.0, 4.0, 3.0]], dtype=torch.float64), torch.tensor([0]), torch.tensor([0]))
    assert boxloss.tight_box_loss(*args).item() == pytest.approx((0.75 - 1) ** 2)
    assert boxloss.tight_box_loss(*args, mode="both").item() == pytest.approx(
        0.5 * ((0.75 - 1) ** 2 + (8 / 15 - 1) ** 2)
    )


def test_mil_loss_by_hand():
    # 1 image, channels (background, object), 2x2 map, box over the left column.
    x = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[0.8, 0.1], [0.6, 0.3]]]], dtype=torch.float64)
    args = (x, torch.tensor([[0.0, 0.0, 1.0, 2.0]], dtype=torch.float64), torch.tensor([0]), torch.tensor([1]))
    # positive bags: rows 0, 1 inside the box (0.8, 0.6), column 0 (0.8);
    # negative bags of class 1: column 1 (max 0.3); no free row.
    import math

    expected = (-math.log(0.8) - math.log(0.6) - math.log(0.8) - math.log(0.7)) / 4
    assert boxloss.mil_box_loss(*args).item() == pytest.approx(expected)


def test_projection_loss_is_zero_for_the_box_mask():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    x[0, 2, 2:5, 1:7] = 1
    loss = boxloss.projection_loss(
        x, torch.tensor([[1.0, 2.0, 7.0, 5.0]], dtype=torch.float64), torch.tensor([0]), torch.tensor([2])
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # eps in the dice denominators


def test_empty_boxes_give_zero_with_gradient():
    probs = make_probs(2, 3, 6, 6, seed=3).requires_grad_()
    boxes = torch.tensor([[1.0, 1.0, 1.0, 5.0]], dtype=torch.float64)
    loss = boxloss.tight_box_loss(probs, boxes, torch.tensor([0]), torch.tensor([1]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(probs.grad == 0)
    none = boxloss.tight_box_loss(
        probs, boxes[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), reduction="none"
    )
    assert none.shape == (0,)


def test_gradcheck_float64():
    probs, boxes, batch, labels, scale = _inputs((2, 3, 7, 8, 4, 0.5), softmax=True)
    x = probs.clone().requires_grad_()
    for fn in (
        lambda p: boxloss.tight_box_loss(p, boxes, batch, labels, spatial_scale=scale, mode="both"),
        lambda p: boxloss.mil_box_loss(p, boxes, batch, labels, spatial_scale=scale),
        lambda p: boxloss.projection_loss(p, boxes, batch, labels, spatial_scale=scale),
        lambda p: OP(p, boxes, batch, labels, scale)[:2],
    ):
        assert torch.autograd.gradcheck(fn, (x,))


def _opcheck_samples():
    out = []
    for case in [(2, 3, 7, 8, 4, 0.5), (1, 1, 5, 5, 2, 1.0), (2, 21, 9, 6, 3, 0.125)]:
        probs, boxes, batch, labels, scale = _inputs(case)
        out.append((probs.requires_grad_(), boxes, batch, labels, scale))
    return out


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_forward(sample):
    torch.library.opcheck(OP, _opcheck_samples()[sample])


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_backward(sample):
    probs, boxes, batch, labels, scale = _opcheck_samples()[sample]
    _, _, row_index, col_index, _ = OP(probs.detach(), boxes, batch, labels, scale)
    torch.library.opcheck(
        OP_BACKWARD,
        (
            torch.rand(row_index.shape, dtype=probs.dtype),
            torch.rand(col_index.shape, dtype=probs.dtype),
            row_index,
            col_index,
            list(probs.shape),
        ),
    )


def test_torch_compile_fullgraph_matches_eager():
    probs, boxes, batch, labels, scale = _inputs((2, 4, 12, 10, 3, 0.5), softmax=True, dtype=torch.float32)
    boxes = boxes.float()

    def step(p):
        return (
            boxloss.tight_box_loss(p, boxes, batch, labels, spatial_scale=scale)
            + boxloss.mil_box_loss(p, boxes, batch, labels, spatial_scale=scale)
            + boxloss.projection_loss(p, boxes, batch, labels, spatial_scale=scale)
        )

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x_eager, x_compiled = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    eager, result = step(x_eager), compiled(x_compiled)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_modules_match_functions():
    probs, boxes, batch, labels, scale = _inputs((2, 3, 9, 9, 3, 1.0), softmax=True)
    pairs = [
        (
            boxloss.TightBoxLoss(mode="both", reduction="sum"),
            boxloss.tight_box_loss,
            dict(mode="both", reduction="sum"),
        ),
        (boxloss.MILBoxLoss(negatives="present"), boxloss.mil_box_loss, dict(negatives="present")),
        (boxloss.ProjectionLoss(reduction="none"), boxloss.projection_loss, dict(reduction="none")),
    ]
    for module, fn, kwargs in pairs:
        torch.testing.assert_close(module(probs, boxes, batch, labels), fn(probs, boxes, batch, labels, **kwargs))
    assert "both" in repr(pairs[0][0])


def test_non_contiguous_and_low_precision():
    probs, boxes, batch, labels, scale = _inputs((2, 3, 11, 9, 4, 1.0), softmax=True)
    expected = _value_and_grad(boxloss.mil_box_loss, probs, boxes, batch, labels)
    value, grad = _value_and_grad(
        boxloss.mil_box_loss, probs.to(memory_format=torch.channels_last), boxes.float(), batch, labels
    )
    torch.testing.assert_close(value, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad, expected[1], rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = probs.to(dtype)
        out = OP(low, boxes, batch, labels, 1.0)
        ref = box_row_col_max_reference(low.double(), boxes, batch, labels, 1.0)
        assert out[0].dtype == dtype
        # a maximum is exact in any dtype
        torch.testing.assert_close(out[0].double(), ref[0], rtol=0, atol=0)
        v, g = _value_and_grad(boxloss.tight_box_loss, low, boxes, batch, labels)
        assert g.dtype == dtype and torch.isfinite(v)


def test_deterministic_and_thread_independent():
    probs, boxes, batch, labels, scale = _inputs((3, 5, 40, 37, 20, 1.0), softmax=True, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        first = _value_and_grad(boxloss.mil_box_loss, probs, boxes.float(), batch, labels)
        torch.set_num_threads(1)
        single = _value_and_grad(boxloss.mil_box_loss, probs, boxes.float(), batch, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


def _good():
    probs, boxes, batch, labels, _ = _inputs((2, 3, 6, 6, 2, 1.0))
    return probs, boxes, batch, labels


BAD = [
    (lambda p, b, bb, bl: (p[0], b, bb, bl), {}, ValueError, "probs must have shape"),
    (lambda p, b, bb, bl: (p.long(), b, bb, bl), {}, TypeError, "probs must be float"),
    (lambda p, b, bb, bl: (p, b[:, :3], bb, bl), {}, ValueError, "boxes must have shape"),
    (lambda p, b, bb, bl: (p, b.long(), bb, bl), {}, TypeError, "boxes must be a floating-point"),
    (lambda p, b, bb, bl: (p, b, bb[:-1], bl), {}, ValueError, "box_batch must have shape"),
    (lambda p, b, bb, bl: (p, b, bb.int(), bl), {}, TypeError, "box_batch must be an int64"),
    (lambda p, b, bb, bl: (p, b, bb, bl.float()), {}, TypeError, "box_labels must be an int64"),
    (lambda p, b, bb, bl: (p, b, bb, bl), {"spatial_scale": 0.0}, ValueError, "spatial_scale must be a positive"),
    (lambda p, b, bb, bl: (p, b, bb, bl), {"spatial_scale": float("nan")}, ValueError, "spatial_scale"),
    (
        lambda p, b, bb, bl: (p, _set(b, 1, 0, float("nan")), bb, bl),
        {},
        ValueError,
        r"boxes must not hold NaN.*boxes\[1\]",
    ),
    (lambda p, b, bb, bl: (p, _set(b, 2, 2, -1.0), bb, bl), {}, ValueError, r"x1 >= x0.*boxes\[2\]"),
    (lambda p, b, bb, bl: (p, _set(b, 0, 3, -9.0), bb, bl), {}, ValueError, r"y1 >= y0.*boxes\[0\]"),
    (
        lambda p, b, bb, bl: (p, b, _set(bb, 3, None, 2), bl),
        {},
        ValueError,
        r"box_batch must lie in \[0, 2\).*box_batch\[3\] = 2",
    ),
    (lambda p, b, bb, bl: (p, b, _set(bb, 0, None, -1), bl), {}, ValueError, r"box_batch\[0\] = -1"),
    (
        lambda p, b, bb, bl: (p, b, bb, _set(bl, 1, None, 3)),
        {},
        ValueError,
        r"box_labels must lie in \[0, 3\).*box_labels\[1\] = 3",
    ),
    (lambda p, b, bb, bl: (p.new_zeros(0, 3, 6, 6), b, bb, bl), {}, ValueError, "non-empty"),
    (lambda p, b, bb, bl: (_nan_in_box(p), b, bb, bl), {}, ValueError, "probs must not hold NaN inside a box"),
]


def _set(t, i, j, value):
    t = t.clone()
    if j is None:
        t[i] = value
    else:
        t[i, j] = value
    return t


def _nan_in_box(p):
    p = p.clone()
    p[:, :] = float("nan")
    return p


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize(
    "fn",
    [boxloss.box_row_col_max, boxloss.tight_box_loss, boxloss.mil_box_loss, boxloss.projection_loss],
    ids=lambda f: f.__name__,
)
def test_bad_input_raises_clear_error(case, fn):
    make, kwargs, error, message = BAD[case]
    with pytest.raises(error, match=message):
        fn(*make(*_good()), **kwargs)


def test_raw_op_rejects_bad_input_without_crashing():
    probs, boxes, batch, labels = _good()
    with pytest.raises(ValueError, match="box_batch must lie"):
        OP(probs, boxes, batch + 10, labels, 1.0)
    with pytest.raises(ValueError, match="spatial_scale"):
        OP(probs, boxes, batch, labels, -1.0)
    with pytest.raises(ValueError, match="grad_row_max and row_index must have shape"):
        OP_BACKWARD(
            torch.zeros(3, 2),
            torch.zeros(3, 6),
            torch.zeros(3, 2, dtype=torch.long),
            torch.zeros(3, 6, dtype=torch.long),
            [2, 3, 6, 6],
        )


def test_loss_settings_are_checked():
    probs, boxes, batch, labels = _good()
    with pytest.raises(ValueError, match="mode must be one of"):
        boxloss.tight_box_loss(probs, boxes, batch, labels, mode="any")
    with pytest.raises(ValueError, match="reduction must be one of"):
        boxloss.mil_box_loss(probs, boxes, batch, labels, reduction="avg")
    with pytest.raises(ValueError, match="background_channel must lie"):
        boxloss.mil_box_loss(probs, boxes, batch, labels, background_channel=3)
    with pytest.raises(ValueError, match="negatives must be one of"):
        boxloss.mil_box_loss(probs, boxes, batch, labels, negatives="some")
    with pytest.raises(ValueError, match="eps must be a positive"):
        boxloss.projection_loss(probs, boxes, batch, labels, eps=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        boxloss.box_row_col_max(probs, boxes, batch, labels, layout="ragged")
    with pytest.raises(ValueError, match="spatial_scale must be a positive"):
        boxloss.TightBoxLoss(spatial_scale=-2)


def test_pack_boxes():
    packed = boxloss.pack_boxes(
        [torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]]), torch.zeros(0, 4), [[1, 1, 2, 2]]],
        [torch.tensor([2, 5]), [], [1]],
    )
    assert packed.boxes.shape == (3, 4) and packed.boxes.dtype == torch.float32
    assert packed.box_batch.tolist() == [0, 0, 2] and packed.box_labels.tolist() == [2, 5, 1]
    with pytest.raises(ValueError, match=r"labels\[0\] must have one label per box"):
        boxloss.pack_boxes([torch.zeros(2, 4)], [torch.tensor([1])])
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \(K, 4\)"):
        boxloss.pack_boxes([torch.zeros(2, 3)], [torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="one entry per image"):
        boxloss.pack_boxes([torch.zeros(2, 4)], [])
    with pytest.raises(TypeError, match="must hold integers"):
        boxloss.pack_boxes([torch.zeros(1, 4)], [torch.tensor([1.5])])
    empty = boxloss.pack_boxes([], [])
    assert empty.boxes.shape == (0, 4)


def test_cuda_kernels_registered_when_built_with_cuda():
    has = torch._C._dispatch_has_kernel_for_dispatch_key("boxloss::box_row_col_max", "CUDA")
    assert has == boxloss.cuda_kernels_built()


def test_raw_backward_rejects_foreign_indices():
    probs, boxes, batch, labels = _good()
    _, _, row_index, col_index, _ = OP(probs, boxes, batch, labels, 1.0)
    grow, gcol = torch.ones(row_index.shape, dtype=probs.dtype), torch.ones(col_index.shape, dtype=probs.dtype)
    for bad_row in (row_index.clamp_min(0) + probs.numel(), row_index - 5, row_index.flip(0)):
        if torch.equal(bad_row, row_index):
            continue
        with pytest.raises(ValueError, match="must be the indices box_row_col_max returned"):
            OP_BACKWARD(grow, gcol, bad_row, col_index, list(probs.shape))


def test_fallback_without_extension_matches():
    import os
    import subprocess
    import sys

    setup = (
        "p = torch.rand(2, 3, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))\n"
        "b = torch.tensor([[1., 1., 6., 7.], [0., 2., 9., 8.], [3., 3., 3., 5.]], dtype=torch.float64)\n"
        "bb, bl = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 1])\n"
        "vals = [boxloss.tight_box_loss(p, b, bb, bl).item(), boxloss.mil_box_loss(p, b, bb, bl).item(),\n"
        "        boxloss.projection_loss(p, b, bb, bl).item(),\n"
        "        boxloss.boxes_to_masks(b, bb, bl, (2, 8, 9), 2, form='labels').sum().item()]\n"
    )
    code = (
        "import warnings, torch, boxloss\n"
        "assert not boxloss.extension_loaded()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n" + "\n".join("    " + line for line in setup.splitlines()) + "\n"
        "assert any('reference' in str(x.message) for x in w)\n"
        "print(repr(vals))\n"
    )
    env = dict(os.environ, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    scope = {"torch": torch, "boxloss": boxloss}
    exec(setup, scope)
    assert eval(result.stdout.strip()) == pytest.approx(scope["vals"], rel=1e-12)
