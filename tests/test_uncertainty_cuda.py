"""CUDA kernels of the uncertainty losses against the CPU kernels and the references.

Skipped where no CUDA device is present (CI compiles the kernels but has no
GPU); run them on any machine with one: python -m pytest tests -m cuda
Both devices draw the same Philox noise for the same seed, so CUDA, CPU and
the reference agree to rounding in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import boxloss
from boxloss.reference import uncertainty_bce_loss_reference, uncertainty_ce_loss_reference
from uncertainty_inputs import make_binary_inputs, make_class_inputs, value_and_grads

pytestmark = pytest.mark.cuda


def _ce_ref(mu, log_var, target, *, seed, **kwargs):
    seed, offset = seed if isinstance(seed, tuple) else (seed, 0)
    return uncertainty_ce_loss_reference(mu, log_var, target, seed=seed, offset=offset, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (2, 21, 17, 13), (1, 4, 1, 300)])
@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
def test_cuda_ce_matches_cpu_and_reference_float64(shape, bootstrap, route, to_cuda):
    B, C, H, W = shape
    mu, log_var, target, box_mask, pp = make_class_inputs(
        B, C, H, W, seed=B * 100 + C, ignore_fraction=0.1, box_fraction=0.7, pixel_perfect=[b == 1 for b in range(B)]
    )
    kwargs = dict(samples=9, seed=(77, 3), tau=1.5, bootstrap=bootstrap, route_gradients=route, reduction="none")
    cpu = value_and_grads(
        boxloss.uncertainty_ce_loss, mu, log_var, target, box_mask=box_mask, pixel_perfect=pp, **kwargs
    )
    ref = value_and_grads(_ce_ref, mu, log_var, target, box_mask=box_mask, pixel_perfect=pp, **kwargs)
    m, s, t, bm, p = to_cuda(mu, log_var, target, box_mask, pp)
    got = value_and_grads(boxloss.uncertainty_ce_loss, m, s, t, box_mask=bm, pixel_perfect=p, **kwargs)
    for g, c, r in zip(got, cpu, ref):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-11)


def test_cuda_ce_float32_close_to_cpu(to_cuda):
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 21, 40, 50, dtype=torch.float32, seed=3, box_fraction=0.6)
    kwargs = dict(samples=20, seed=5, box_mask=box_mask, reduction="none", route_gradients=False)
    cpu = value_and_grads(boxloss.uncertainty_ce_loss, mu, log_var, target, **kwargs)
    m, s, t, bm = to_cuda(mu, log_var, target, box_mask)
    got = value_and_grads(boxloss.uncertainty_ce_loss, m, s, t, **dict(kwargs, box_mask=bm))
    for g, c in zip(got, cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_ce_low_precision(dtype, to_cuda):
    mu, log_var, target, _, _ = make_class_inputs(2, 5, 16, 16, seed=7)
    m, s, t = to_cuda(mu.to(dtype), log_var.to(dtype), target)
    value, grad_mu, grad_s = value_and_grads(boxloss.uncertainty_ce_loss, m, s, t, samples=8, seed=1, reduction="none")
    exact = boxloss.uncertainty_ce_loss(m.float(), s.float(), t, samples=8, seed=1, reduction="none")
    assert value.dtype == dtype and grad_mu.dtype == dtype and grad_s.dtype == dtype
    torch.testing.assert_close(value, exact.to(dtype))


@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
def test_cuda_bce_matches_reference(bootstrap, route, to_cuda):
    mu, log_var, target, box_mask, pp = make_binary_inputs(
        3, 33, 17, seed=11, soft=True, pixel_perfect=[False, True, False]
    )
    kwargs = dict(bootstrap=bootstrap, route_gradients=route, reduction="none")
    ref = value_and_grads(uncertainty_bce_loss_reference, mu, log_var, target, box_mask, pixel_perfect=pp, **kwargs)
    m, s, t, bm, p = to_cuda(mu, log_var, target, box_mask, pp)
    got = value_and_grads(boxloss.uncertainty_bce_loss, m, s, t, bm, pixel_perfect=p, **kwargs)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-12)


def test_cuda_binary_void_pixels_match_cpu(to_cuda):
    mu, log_var, target, box_mask, pp = make_binary_inputs(2, 9, 11, seed=12, pixel_perfect=[False, True])
    target[:, ::3] = 255
    for fn in (boxloss.uncertainty_bce_loss, boxloss.uncertainty_l2_loss):
        for reduction in ("mean", "none"):
            cpu = value_and_grads(fn, mu, log_var, target, box_mask, pixel_perfect=pp, reduction=reduction)
            m, s, t, bm, p = to_cuda(mu, log_var, target, box_mask, pp)
            got = value_and_grads(fn, m, s, t, bm, pixel_perfect=p, reduction=reduction)
            for g, c in zip(got, cpu):
                torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-12)


def test_cuda_gradcheck():
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 4, 3, 5, device="cuda", seed=13, box_fraction=0.6)
    mu.requires_grad_()
    log_var.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: boxloss.uncertainty_ce_loss(
            m, s, target, samples=5, seed=3, tau=100.0, route_gradients=False, box_mask=box_mask, reduction="none"
        ),
        (mu, log_var),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 4, 5, device="cuda", seed=17, soft=True)
    bmu.requires_grad_()
    blv.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: boxloss.uncertainty_bce_loss(m, s, bt, bmask, route_gradients=False, reduction="none"),
        (bmu, blv),
    )


def test_cuda_opcheck():
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 5, 4, 6, device="cuda", seed=19, box_fraction=0.5, pixel_perfect=[False, True]
    )
    seed = torch.tensor([7, 2])  # the seed stays on the CPU
    args = (mu.requires_grad_(), log_var.requires_grad_(), target, box_mask, pp, seed, 4, 1.5, True, False, 255)
    torch.library.opcheck(torch.ops.boxloss.uncertainty_ce_loss.default, args)
    loss, lse = torch.ops.boxloss.uncertainty_ce_loss.default(*args)
    torch.library.opcheck(
        torch.ops.boxloss._uncertainty_ce_loss_backward.default,
        (
            torch.rand_like(loss),
            mu.detach(),
            log_var.detach(),
            target,
            box_mask,
            pp,
            seed,
            lse.detach(),
            4,
            1.5,
            True,
            False,
            255,
        ),
    )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 5, 6, device="cuda", seed=23)
    torch.library.opcheck(
        torch.ops.boxloss.uncertainty_bce_loss.default,
        (bmu.requires_grad_(), blv.requires_grad_(), bt, bmask, pp, 2.5, 0.2, True, True),
    )


def test_cuda_compile_fullgraph():
    mu, log_var, target, _, _ = make_class_inputs(2, 6, 16, 16, dtype=torch.float32, device="cuda", seed=29)
    fn = lambda m, s: boxloss.uncertainty_ce_loss(m, s, target, samples=6, seed=4)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(mu, log_var), fn(mu, log_var))


def test_cuda_deterministic():
    mu, log_var, target, box_mask, _ = make_class_inputs(
        4, 21, 60, 50, dtype=torch.float32, device="cuda", seed=31, box_fraction=0.5
    )
    kwargs = dict(samples=20, seed=9, box_mask=box_mask, reduction="none")
    first = value_and_grads(boxloss.uncertainty_ce_loss, mu, log_var, target, **kwargs)
    second = value_and_grads(boxloss.uncertainty_ce_loss, mu, log_var, target, **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_extreme_inputs_are_finite(dtype):
    C = 21
    g = torch.Generator().manual_seed(37)
    target = torch.randint(0, C, (2, 6, 5), generator=g).cuda()
    for mu_value, lv_value in itertools.product([1e4, -1e4, 0.0], [-20.0, 20.0]):
        mu = torch.full((2, C, 6, 5), mu_value, dtype=dtype, device="cuda")
        mu[:, 3] = -mu_value
        lv = torch.full((2, C, 6, 5), lv_value, dtype=dtype, device="cuda")
        for bootstrap, route in [(True, True), (True, False), (False, True)]:
            out = value_and_grads(
                boxloss.uncertainty_ce_loss,
                mu,
                lv,
                target,
                samples=20,
                seed=1,
                bootstrap=bootstrap,
                route_gradients=route,
                reduction="none",
            )
            assert all(torch.isfinite(t).all() for t in out)


def test_cuda_bad_targets_and_devices_raise():
    mu, log_var, target, _, _ = make_class_inputs(2, 3, 8, 8, dtype=torch.float32, device="cuda", seed=41)
    with pytest.raises(ValueError, match="target must hold class indices"):
        boxloss.uncertainty_ce_loss(mu, log_var, target + 5, seed=0)
    with pytest.raises(ValueError, match="target must have the device of mu"):
        boxloss.uncertainty_ce_loss(mu, log_var, target.cpu(), seed=0)
    bmu, blv, bt, bmask, _ = make_binary_inputs(1, 4, 4, dtype=torch.float32, device="cuda", seed=43)
    with pytest.raises(ValueError, match="target must hold probabilities"):
        boxloss.uncertainty_bce_loss(bmu, blv, bt * 3, bmask)
