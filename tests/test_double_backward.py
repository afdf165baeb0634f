"""Double backward of every differentiable op: either exact (gradgradcheck in float64 against finite differences of
the gradient) or a clear error naming the function when the gradient is differentiated, never a silent 0.

Each case builds float64 inputs and returns ``(loss_fn, inputs)``: ``loss_fn(*inputs)`` is a scalar.
"""

from __future__ import annotations

import pytest
import torch

import boxloss
from bana_inputs import make_bana_boxes, make_features
from uncertainty_inputs import make_binary_inputs, make_class_inputs

EXACT, RAISES = "exact", "raises"


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _probs(B, C, H, W, seed=0, low=0.05, high=0.95):
    x = torch.rand(B, C, H, W, generator=_generator(seed), dtype=torch.float64)
    return (low + (high - low) * x).requires_grad_()


def _boxes():
    boxes = torch.tensor([[1.0, 1.0, 6.0, 5.0], [0.0, 2.0, 4.0, 7.0], [2.5, 0.5, 7.0, 6.0]], dtype=torch.float64)
    return boxes, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 2])


def _sparse_crf(kind, **kwargs):
    def build():
        probs = _probs(2, 3, 5, 6)
        image = torch.rand(2, 3, 5, 6, generator=_generator(1), dtype=torch.float64)
        return (lambda p: boxloss.sparse_crf_loss(p, image, sigma=0.3, kind=kind, **kwargs)), (probs,)

    return build


def _sparse_crf_masked():
    probs = _probs(2, 3, 5, 6)
    image = torch.rand(2, 3, 5, 6, generator=_generator(1), dtype=torch.float64)
    mask = torch.rand(2, 5, 6, generator=_generator(2)) > 0.3
    return (
        lambda p: boxloss.sparse_crf_loss(
            p, image, sigma=0.3, kind="potts", valid_mask=mask, channels=[2, 0], neighbourhood=4, dilation=2
        ),
        (probs,),
    )


def _dense_crf(normalize, masked=False):
    def build():
        probs = _probs(2, 3, 6, 7).detach().softmax(1).requires_grad_()
        image = torch.rand(2, 3, 6, 7, generator=_generator(1), dtype=torch.float64) * 255
        mask = (torch.rand(2, 6, 7, generator=_generator(2)) > 0.3) if masked else None
        return (
            lambda p: boxloss.dense_crf_loss(
                p, image, sigma_xy=3.0, sigma_rgb=40.0, valid_mask=mask, normalize=normalize, reduction="sum"
            ),
            (probs,),
        )

    return build


def _bilateral():
    values = torch.randn(2, 2, 5, 6, generator=_generator(0), dtype=torch.float64).requires_grad_()
    image = torch.rand(2, 3, 5, 6, generator=_generator(1), dtype=torch.float64) * 255
    weight = torch.randn(2, 2, 5, 6, generator=_generator(3), dtype=torch.float64)
    # Quadratic in the values, so that the second derivative is not 0.
    return (lambda v: (boxloss.bilateral_filter(v, image, 3.0, 40.0) * v * weight).sum()), (values,)


def _row_col_max():
    probs = _probs(2, 3, 8, 7)
    boxes, batch, labels = _boxes()
    weight = torch.rand(3, 8, generator=_generator(4), dtype=torch.float64)

    def loss(p):
        out = boxloss.box_row_col_max(p, boxes, batch, labels, layout="dense")
        return (out.row_max.square() * weight).sum() + out.col_max.pow(3).sum()

    return loss, (probs,)


def _box_prior(fn, **kwargs):
    def build():
        probs = _probs(2, 3, 8, 7)
        boxes, batch, labels = _boxes()
        return (lambda p: fn(p, boxes, batch, labels, **kwargs)), (probs,)

    return build


def _regularized(prior):
    def build():
        fg = _probs(3, 1, 9, 10)
        image = torch.rand(3, 3, 9, 10, generator=_generator(1), dtype=torch.float64)
        negative = torch.tensor([False, True, False])
        loss = boxloss.RegularizedLoss(prior=prior, use_negative=True)
        return (lambda x: loss(x, image, negative=negative)), (fg,)

    return build


def _attention():
    f = make_features(2, 4, 7, 8).requires_grad_()
    boxes, batch = make_bana_boxes(2, 14, 16, 2)
    return (lambda x: boxloss.background_attention(x, boxes, batch, grid_size=2, spatial_scale=0.5).attention.sum()), (
        f,
    )


def _pool():
    f = make_features(2, 4, 7, 8).requires_grad_()
    a = torch.rand(2, 7, 8, generator=_generator(1), dtype=torch.float64).requires_grad_()
    boxes, batch = make_bana_boxes(2, 14, 16, 2)
    return (
        lambda x, att: boxloss.background_aware_pool(x, att, boxes, batch, output_size=2, spatial_scale=0.5).sum()
    ), (
        f,
        a,
    )


def _fused_pool():
    f = make_features(2, 4, 7, 8).requires_grad_()
    boxes, batch = make_bana_boxes(2, 14, 16, 2)
    bap = boxloss.BackgroundAwarePooling(grid_size=2, output_size=2, spatial_scale=0.5)
    return (lambda x: bap(x, boxes, batch)[0].sum()), (f,)


def _uncertainty_bce():
    mu, log_var, target, box_mask, _ = make_binary_inputs(2, 5, 6)
    return (lambda m, s: boxloss.uncertainty_bce_loss(m, s, target, box_mask)), (
        mu.requires_grad_(),
        log_var.requires_grad_(),
    )


def _uncertainty_ce():
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 3, 4, 5, box_fraction=0.6)
    return (lambda m, s: boxloss.uncertainty_ce_loss(m, s, target, samples=4, seed=3, box_mask=box_mask)), (
        mu.requires_grad_(),
        log_var.requires_grad_(),
    )


# (case, builder, expectation, the function name the error must carry)
CASES = [
    ("sparse_crf_loss[l1]", _sparse_crf("l1"), EXACT, None),
    ("sparse_crf_loss[potts]", _sparse_crf("potts"), EXACT, None),
    ("sparse_crf_loss[potts, mask, channels]", _sparse_crf_masked, EXACT, None),
    ("dense_crf_loss[normalized]", _dense_crf(True), EXACT, None),
    ("dense_crf_loss[energy, mask]", _dense_crf(False, masked=True), EXACT, None),
    ("bilateral_filter", _bilateral, EXACT, None),
    ("box_row_col_max", _row_col_max, EXACT, None),
    ("tight_box_loss[either]", _box_prior(boxloss.tight_box_loss), EXACT, None),
    ("tight_box_loss[both]", _box_prior(boxloss.tight_box_loss, mode="both"), EXACT, None),
    ("mil_box_loss", _box_prior(boxloss.mil_box_loss), EXACT, None),
    ("projection_loss", _box_prior(boxloss.projection_loss), EXACT, None),
    ("RegularizedLoss[tight]", _regularized("tight"), EXACT, None),
    ("RegularizedLoss[centre]", _regularized("centre"), EXACT, None),
    ("background_attention", _attention, RAISES, "background_attention"),
    ("background_aware_pool", _pool, RAISES, "background_aware_pool"),
    ("BackgroundAwarePooling", _fused_pool, RAISES, "BackgroundAwarePooling"),
    ("uncertainty_bce_loss", _uncertainty_bce, RAISES, "uncertainty_bce_loss"),
    ("uncertainty_ce_loss", _uncertainty_ce, RAISES, "uncertainty_ce_loss"),
]


@pytest.mark.parametrize("case, build, expectation, name", CASES, ids=[c[0] for c in CASES])
def test_double_backward_is_exact_or_raises(case, build, expectation, name):
    loss_fn, inputs = build()
    if expectation == EXACT:
        assert torch.autograd.gradgradcheck(loss_fn, inputs, atol=1e-5, rtol=1e-4)
        return
    grads = torch.autograd.grad(loss_fn(*inputs), inputs, create_graph=True)  # the first order still works
    assert all(g.requires_grad for g in grads)
    directions = [torch.randn_like(g) for g in grads]
    penalty = sum((g * v).sum() for g, v in zip(grads, directions))
    with pytest.raises(boxloss.DoubleBackwardError, match=rf"^{name}: double backward is not implemented"):
        torch.autograd.grad(penalty, inputs)


def test_double_backward_error_is_a_not_implemented_error():
    # Code that catches NotImplementedError (e.g. to fall back to finite differences) catches it.
    assert issubclass(boxloss.DoubleBackwardError, NotImplementedError)


@pytest.mark.parametrize("kind", ["l1", "potts"])
def test_sparse_crf_hessian_vector_product_matches_the_reference(kind):
    # The reference is plain PyTorch, so autograd differentiates it twice: the op's
    # Hessian-vector product must be the same.
    from boxloss.reference.pairwise import sparse_crf_loss_reference

    probs = _probs(2, 2, 6, 5)
    image = torch.rand(2, 3, 6, 5, generator=_generator(1), dtype=torch.float64)
    v = torch.randn(2, 2, 6, 5, generator=_generator(2), dtype=torch.float64)
    hvps = []
    for fn in (boxloss.sparse_crf_loss, sparse_crf_loss_reference):
        (g,) = torch.autograd.grad(fn(probs, image, sigma=0.2, kind=kind), probs, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), probs, allow_unused=True)
        hvps.append(torch.zeros_like(probs) if hvp is None else hvp)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-12)
    assert (hvps[0].abs().max() > 0) == (kind == "potts")


def test_tight_box_second_derivative_is_not_zero():
    # (mean max - 1)^2 has curvature 2 / r^2 along the arg-max pixels: the second derivative is not a silent 0.
    probs = _probs(1, 1, 6, 6)
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    batch, labels = torch.tensor([0]), torch.tensor([0])
    (g,) = torch.autograd.grad(boxloss.tight_box_loss(probs, boxes, batch, labels), probs, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), probs)
    assert h.abs().sum() > 0


def test_double_backward_compiles_first_order():
    # The autograd formulas of the backward ops do not disturb a compiled training step.
    probs = _probs(2, 3, 5, 6)
    image = torch.rand(2, 3, 5, 6, generator=_generator(1), dtype=torch.float64)
    boxes, batch, labels = _boxes()

    def step(p):
        return boxloss.sparse_crf_loss(p, image, kind="potts") + boxloss.tight_box_loss(p, boxes, batch, labels)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (eager,) = torch.autograd.grad(step(probs), probs)
    (out,) = torch.autograd.grad(compiled(probs), probs)
    torch.testing.assert_close(out, eager)
