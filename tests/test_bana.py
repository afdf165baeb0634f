"""Background attention and background-aware pooling (BANA Eq. 1-4): the fused
ops against the loop-over-boxes references, float64 gradcheck, opcheck,
torch.compile, edge cases and bad inputs."""

import math

import pytest
import torch

import boxloss
from bana_inputs import make_bana_boxes, make_features
from boxloss.reference.background_attention import (
    background_attention_reference,
    background_aware_pool_reference,
)

B, D, h, w, SCALE = 3, 6, 9, 11, 0.5
IMAGE_H, IMAGE_W = 18, 22


def _inputs(boxes_per_image=2, seed=0, special=True, dtype=torch.float64):
    f = make_features(B, D, h, w, seed=seed, dtype=dtype)
    boxes, batch = make_bana_boxes(B, IMAGE_H, IMAGE_W, boxes_per_image, seed=seed, special=special)
    return f, boxes, batch


def _close(a, b, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("grid_size", [1, 2, 4, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_matches_reference(grid_size, seed):
    f, boxes, batch = _inputs(seed=seed)
    out = boxloss.background_attention(f, boxes, batch, grid_size=grid_size, spatial_scale=SCALE)
    ref = background_attention_reference(f, boxes, batch, grid_size=grid_size, spatial_scale=SCALE)
    _close(out.attention, ref[0])
    _close(out.queries, ref[1])
    assert torch.equal(out.valid, ref[2]) and torch.equal(out.fallback, ref[3])
    if grid_size == 12:  # more cells than rows: some are empty and invalid
        assert not out.valid.all()


def test_attention_values_by_hand():
    # One image, two pixels of background with features e0 and e1; a box over the rest.
    f = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    f[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    f[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    f[0, :, 0, 2] = torch.tensor([1.0, 1.0])
    f[0, :, 0, 3] = torch.tensor([-1.0, 0.5])
    boxes = torch.tensor([[2.0, 0.0, 4.0, 1.0]], dtype=torch.float64)
    out = boxloss.background_attention(f, boxes, torch.tensor([0]), grid_size=1, min_background=0.5)
    # q = (0.5, 0.5); cos with (1, 1) = 1; cos with (-1, 0.5) < 0 -> 0.
    _close(out.queries[0, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    _close(out.attention[0, 0], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    # Grid of 2 x 2 over a 1 x 4 map: the first row of cells is empty.
    out2 = boxloss.background_attention(f, boxes, torch.tensor([0]), grid_size=2, min_background=0.5)
    assert out2.valid.tolist() == [[False, False, True, False]]
    _close(out2.queries[0, 2], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_bg_mask_and_fallback():
    f, boxes, batch = _inputs()
    g = torch.Generator().manual_seed(3)
    bg = torch.rand(B, h, w, generator=g) < 0.5
    out = boxloss.background_attention(f, boxes, batch, grid_size=2, spatial_scale=SCALE, bg_mask=bg)
    ref = background_attention_reference(f, boxes, batch, grid_size=2, spatial_scale=SCALE, bg_mask=bg)
    _close(out.attention, ref[0])
    _close(out.queries, ref[1])
    # A whole-image box: no background, fallback, A = 0 everywhere.
    whole = torch.tensor([[-3.0, -3.0, 1e9, 1e9]], dtype=torch.float64)
    out = boxloss.background_attention(f[:1], whole, torch.tensor([0]), spatial_scale=SCALE)
    assert out.fallback.tolist() == [True] and not out.valid.any()
    assert torch.equal(out.attention, torch.zeros_like(out.attention))
    # min_background = 1: every image with a box falls back.
    out = boxloss.background_attention(f, boxes, batch, spatial_scale=SCALE, min_background=1.0)
    assert out.fallback.all()
    inside = out.attention < 1
    assert torch.equal(out.attention[inside], torch.zeros_like(out.attention[inside]))


def test_no_boxes():
    f = make_features(2, 4, 5, 6)
    empty = torch.zeros(0, 4, dtype=torch.float64)
    none = torch.zeros(0, dtype=torch.long)
    out = boxloss.background_attention(f, empty, none)
    assert torch.equal(out.attention, torch.ones(2, 5, 6, dtype=torch.float64))
    assert out.valid.all() and not out.fallback.any()
    pooled = boxloss.background_aware_pool(f, out.attention, empty, none, output_size=2)
    assert pooled.shape == (0, 4, 2, 2)
    f.requires_grad_(True)
    out = boxloss.background_attention(f, empty, none)
    (out.attention.sum() + out.queries.sum()).backward()
    assert torch.isfinite(f.grad).all()


@pytest.mark.parametrize("output_size", [1, 2, 3])
def test_pool_matches_reference(output_size):
    f, boxes, batch = _inputs(boxes_per_image=3)
    att = boxloss.background_attention(f, boxes, batch, spatial_scale=SCALE).attention
    pooled = boxloss.background_aware_pool(f, att, boxes, batch, output_size=output_size, spatial_scale=SCALE)
    ref = background_aware_pool_reference(f, att, boxes, batch, output_size=output_size, spatial_scale=SCALE)
    _close(pooled, ref)
    # Empty boxes (zero width, wholly outside) pool 0.
    assert torch.equal(pooled[-2:], torch.zeros_like(pooled[-2:]))


def test_pool_plain_mean_bins():
    f = make_features(1, 3, 6, 6)
    att = torch.rand(1, 6, 6, dtype=torch.float64)
    att[0, :3] = 1.0  # the top bins have zero weight: plain mean
    boxes = torch.tensor([[0.0, 0.0, 6.0, 6.0]], dtype=torch.float64)
    pooled = boxloss.background_aware_pool(f, att, boxes, torch.tensor([0]), output_size=2)
    _close(pooled[0, :, 0, 0], f[0, :, :3, :3].mean((1, 2)))
    w = 1 - att[0, 3:, 3:]
    _close(pooled[0, :, 1, 1], (f[0, :, 3:, 3:] * w).sum((1, 2)) / w.sum())


def test_gap_when_attention_zero():
    f = make_features(2, 4, 7, 7)
    boxes, batch = make_bana_boxes(2, 7, 7, 2)
    pooled = boxloss.background_aware_pool(f, torch.zeros(2, 7, 7, dtype=torch.float64), boxes, batch)
    ref = background_aware_pool_reference(f, torch.zeros(2, 7, 7, dtype=torch.float64), boxes, batch)
    _close(pooled, ref)


def _attention_objective(grid_size, boxes, batch, scale, bg_mask=None):
    g = torch.Generator().manual_seed(7)

    def fn(f):
        out = boxloss.background_attention(f, boxes, batch, grid_size=grid_size, spatial_scale=scale, bg_mask=bg_mask)
        wa = torch.rand(out.attention.shape, generator=g, dtype=torch.float64)
        wq = torch.rand(out.queries.shape, generator=g, dtype=torch.float64)
        g.manual_seed(7)
        return (out.attention * wa).sum() + (out.queries * wq).sum()

    return fn


@pytest.mark.parametrize("grid_size", [1, 2, 4])
def test_attention_gradcheck(grid_size):
    f = make_features(2, 4, 6, 7, seed=grid_size).requires_grad_(True)
    boxes, batch = make_bana_boxes(2, 12, 14, 2, seed=grid_size, special=True)
    assert torch.autograd.gradcheck(
        lambda x: boxloss.background_attention(x, boxes, batch, grid_size=grid_size, spatial_scale=0.5)[:2], (f,)
    )
    # Non-contiguous features.
    fnc = make_features(2, 7, 6, 4, seed=1).transpose(1, 3).requires_grad_(True)
    assert not fnc.is_contiguous()
    assert torch.autograd.gradcheck(
        lambda x: boxloss.background_attention(x, boxes, batch, grid_size=grid_size, spatial_scale=0.5)[:2], (fnc,)
    )


def test_attention_gradient_matches_reference():
    f, boxes, batch = _inputs(seed=2)
    f1 = f.clone().requires_grad_(True)
    f2 = f.clone().requires_grad_(True)
    obj = _attention_objective(4, boxes, batch, SCALE)
    obj(f1).backward()
    g = torch.Generator().manual_seed(7)
    ref = background_attention_reference(f2, boxes, batch, grid_size=4, spatial_scale=SCALE)
    wa = torch.rand(ref[0].shape, generator=g, dtype=torch.float64)
    wq = torch.rand(ref[1].shape, generator=g, dtype=torch.float64)
    ((ref[0] * wa).sum() + (ref[1] * wq).sum()).backward()
    _close(f1.grad, f2.grad)


@pytest.mark.parametrize("output_size", [1, 2])
def test_pool_gradcheck(output_size):
    f = make_features(2, 3, 6, 7, seed=output_size).requires_grad_(True)
    a = torch.rand(2, 6, 7, dtype=torch.float64).requires_grad_(True)
    boxes, batch = make_bana_boxes(2, 12, 14, 3, seed=output_size, special=True)
    assert torch.autograd.gradcheck(
        lambda x, y: boxloss.background_aware_pool(x, y, boxes, batch, output_size=output_size, spatial_scale=0.5),
        (f, a),
    )


def test_attention_then_pool_gradcheck():
    f = make_features(2, 4, 6, 6, seed=5).requires_grad_(True)
    boxes, batch = make_bana_boxes(2, 6, 6, 2, seed=5)
    bap = boxloss.BackgroundAwarePooling(grid_size=2, output_size=2)

    def fn(x):
        pooled, att = bap(x, boxes, batch)
        return pooled, att.queries

    assert torch.autograd.gradcheck(fn, (f,))


def test_opcheck():
    f, boxes, batch = _inputs()
    f = f.requires_grad_(True)
    torch.library.opcheck(torch.ops.boxloss.background_attention.default, (f, boxes, batch, 2, SCALE, None, 0.125))
    bg = torch.rand(B, h, w) < 0.5
    torch.library.opcheck(torch.ops.boxloss.background_attention.default, (f, boxes, batch, 4, SCALE, bg, 0.125))
    a = torch.rand(B, h, w, dtype=torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.boxloss.background_aware_pool.default, (f, a, boxes, batch, 2, SCALE))


def test_compile_matches_eager():
    f, boxes, batch = _inputs(dtype=torch.float32)
    bap = boxloss.BackgroundAwarePooling(grid_size=4, output_size=2, spatial_scale=SCALE)

    def step(x):
        pooled, att = bap(x, boxes, batch)
        return pooled.square().sum() + att.queries.sum() + att.attention.sum()

    x1 = f.clone().requires_grad_(True)
    x2 = f.clone().requires_grad_(True)
    eager = step(x1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_float32_and_half_follow_float64():
    f, boxes, batch = _inputs()
    ref = boxloss.background_attention(f, boxes, batch, spatial_scale=SCALE)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        out = boxloss.background_attention(f.to(dtype), boxes, batch, spatial_scale=SCALE)
        assert out.attention.dtype == dtype
        torch.testing.assert_close(out.attention.double(), ref.attention, atol=tol * 4, rtol=tol)


def test_classification_loss():
    f, boxes, batch = _inputs(special=False)
    labels = torch.tensor([1, 2, 3, 1, 2, 3])
    bap = boxloss.BackgroundAwarePooling(grid_size=2, output_size=2, spatial_scale=SCALE)
    pooled, att = bap(f, boxes, batch)
    weight = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    loss = boxloss.bap_classification_loss(pooled, labels, att.queries, att.valid, weight)
    # By hand: mean CE over 6 boxes x 4 bins and the valid queries.
    logits_b = pooled.permute(0, 2, 3, 1).reshape(-1, D) @ weight.T
    logits_q = att.queries[att.valid] @ weight.T
    ce = torch.cat(
        [
            torch.nn.functional.cross_entropy(logits_b, labels.repeat_interleave(4), reduction="none"),
            torch.nn.functional.cross_entropy(logits_q, torch.zeros(len(logits_q), dtype=torch.long), reduction="none"),
        ]
    )
    _close(loss, ce.mean())
    loss.backward()
    empty = boxloss.bap_classification_loss(pooled[:0], labels[:0], att.queries[:, :0], att.valid[:, :0], weight)
    assert empty.item() == 0.0


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (
            lambda a: a.update(
                features=a["features"]
                .clone()
                .index_put_((torch.tensor(0),), torch.tensor(math.nan, dtype=torch.float64))
            ),
            ValueError,
            "finite",
        ),
        (
            lambda a: a.update(
                boxes=torch.tensor([[math.nan, 0.0, 4.0, 4.0]], dtype=torch.float64), box_batch=torch.tensor([0])
            ),
            ValueError,
            "NaN",
        ),
        (
            lambda a: a.update(
                boxes=torch.tensor([[5.0, 0.0, 4.0, 4.0]], dtype=torch.float64), box_batch=torch.tensor([0])
            ),
            ValueError,
            "x1 >= x0",
        ),
        (lambda a: a.update(box_batch=torch.full_like(a["box_batch"], 7)), ValueError, "box_batch must lie"),
        (lambda a: a.update(box_batch=a["box_batch"][:-1]), ValueError, "box_batch must have shape"),
        (lambda a: a.update(box_batch=a["box_batch"].int()), TypeError, "int64"),
        (lambda a: a.update(features=a["features"][0]), ValueError, "features must have shape"),
        (lambda a: a.update(features=a["features"].long()), TypeError, "features must be"),
        (lambda a: a.update(boxes=a["boxes"][:, :3]), ValueError, "boxes must have shape"),
        (lambda a: a.update(grid_size=0), ValueError, "grid_size"),
        (lambda a: a.update(spatial_scale=-1.0), ValueError, "spatial_scale"),
        (lambda a: a.update(min_background=1.5), ValueError, "min_background"),
        (lambda a: a.update(bg_mask=torch.ones(1, 2, 3, dtype=torch.bool)), ValueError, "bg_mask"),
        (lambda a: a.update(bg_mask=torch.ones(B, h, w)), TypeError, "bg_mask"),
    ],
)
def test_attention_bad_inputs(mutate, exc, match):
    f, boxes, batch = _inputs()
    args = dict(features=f, boxes=boxes, box_batch=batch, grid_size=4, spatial_scale=SCALE)
    mutate(args)
    with pytest.raises(exc, match=match):
        boxloss.background_attention(args.pop("features"), args.pop("boxes"), args.pop("box_batch"), **args)


def test_pool_bad_inputs():
    f, boxes, batch = _inputs()
    a = torch.rand(B, h, w, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention must have shape"):
        boxloss.background_aware_pool(f, a[:, :-1], boxes, batch)
    with pytest.raises(ValueError, match="output_size"):
        boxloss.background_aware_pool(f, a, boxes, batch, output_size=0)
    with pytest.raises(ValueError, match="box_batch must lie"):
        boxloss.background_aware_pool(f, a, boxes, torch.full_like(batch, -1))
    with pytest.raises(TypeError, match="attention"):
        boxloss.background_aware_pool(f, a > 0.5, boxes, batch)


@pytest.mark.parametrize("use", ["all", "pooled", "queries"])
def test_fused_module_matches_two_ops(use):
    f, boxes, batch = _inputs(boxes_per_image=3, seed=4)
    bg = torch.rand(B, h, w, generator=torch.Generator().manual_seed(2)) < 0.6
    for mask in (None, bg):
        x1 = f.clone().requires_grad_(True)
        x2 = f.clone().requires_grad_(True)
        bap = boxloss.BackgroundAwarePooling(grid_size=2, output_size=2, spatial_scale=SCALE)
        pooled, att = bap(x1, boxes, batch, bg_mask=mask)
        att2 = boxloss.background_attention(x2, boxes, batch, grid_size=2, spatial_scale=SCALE, bg_mask=mask)
        pooled2 = boxloss.background_aware_pool(x2, att2.attention, boxes, batch, output_size=2, spatial_scale=SCALE)
        _close(pooled, pooled2)
        _close(att.attention, att2.attention)
        _close(att.queries, att2.queries)
        assert torch.equal(att.valid, att2.valid) and torch.equal(att.fallback, att2.fallback)
        g = torch.Generator().manual_seed(9)
        wp = torch.rand(pooled.shape, generator=g, dtype=torch.float64)
        wa = torch.rand(att.attention.shape, generator=g, dtype=torch.float64)

        def objective(p, a, wp=wp, wa=wa):
            if use == "pooled":
                return (p * wp).sum()
            if use == "queries":
                return a.queries.sum()
            return (p * wp).sum() + (a.attention * wa).sum() + a.queries.square().sum()

        objective(pooled, att).backward()
        objective(pooled2, att2).backward()
        _close(x1.grad, x2.grad)


def test_fused_opcheck():
    f, boxes, batch = _inputs()
    f = f.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.boxloss.background_attention_pool.default, (f, boxes, batch, 2, 2, SCALE, None, 0.125)
    )
