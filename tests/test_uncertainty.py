"""boxloss uncertainty losses (CPU kernels) against the references written from Neven et al.,
"Weakly-Supervised Semantic Segmentation by Learning Label Uncertainty", arXiv:2110.05926 (Eq. 2-3, 8-11, 13-16)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import boxloss
from boxloss.reference import (
    philox4x32_10,
    philox_normal,
    uncertainty_bce_loss_reference,
    uncertainty_ce_loss_reference,
    uncertainty_l2_loss_reference,
)
from uncertainty_inputs import make_binary_inputs, make_class_inputs, value_and_grads

CE = torch.ops.boxloss.uncertainty_ce_loss.default
CE_BACKWARD = torch.ops.boxloss._uncertainty_ce_loss_backward.default
BCE = torch.ops.boxloss.uncertainty_bce_loss.default
BCE_BACKWARD = torch.ops.boxloss._uncertainty_bce_loss_backward.default


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def test_compiled_ops_are_loaded():
    assert boxloss.extension_loaded(), boxloss.extension_error()


# ------------------------------------------------------------------ noise


def test_numpy_philox_known_answers():
    # Random123 kat_vectors, "philox4x32 10": counter, key -> output.
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        out = philox4x32_10([np.array([c], dtype=np.uint32) for c in counter], key)
        assert [int(w[0]) for w in out] == list(expected)


def test_noise_is_independent_standard_normal():
    scipy_stats = pytest.importorskip("scipy.stats")
    eps = philox_normal(12345, 0, 40, 2, 7, 16, 16)
    flat = eps.flatten().numpy()
    assert scipy_stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    # No correlation between neighbouring classes (same Philox block or not),
    # samples or pixels.
    for a, b in [
        (eps[:, :, 0], eps[:, :, 1]),
        (eps[:, :, 3], eps[:, :, 4]),
        (eps[:-1], eps[1:]),
        (eps[..., :-1], eps[..., 1:]),
    ]:
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 0.02, r


def test_noise_depends_on_seed_and_offset_only_through_the_key_and_counter():
    a = philox_normal(7, 0, 3, 2, 5, 4, 6)
    assert torch.equal(a, philox_normal(7, 0, 3, 2, 5, 4, 6))
    assert not torch.allclose(a, philox_normal(8, 0, 3, 2, 5, 4, 6))
    assert not torch.allclose(a, philox_normal(7, 1, 3, 2, 5, 4, 6))
    # Samples and classes are counter words: a longer draw extends a shorter one.
    assert torch.equal(philox_normal(7, 0, 5, 2, 9, 4, 6)[:3, :, :5], a)
    # 64-bit keys: -1 and 2^64 - 1 are the same bits.
    assert torch.equal(philox_normal(-1, 0, 1, 1, 2, 2, 2), philox_normal(2**64 - 1, 0, 1, 1, 2, 2, 2))


# ------------------------------------------------------------ multi-class

CLASS_SHAPES = [
    (1, 1, 1, 1),
    (2, 2, 1, 17),
    (1, 3, 5, 1),
    (2, 4, 3, 7),
    (2, 5, 6, 5),
    (1, 21, 5, 7),
    (3, 6, 4, 8),
]


def _ce(mu, log_var, target, **kwargs):
    return boxloss.uncertainty_ce_loss(mu, log_var, target, **kwargs)


def _ce_ref(mu, log_var, target, *, seed=0, **kwargs):
    offset = 0
    if isinstance(seed, tuple):
        seed, offset = seed
    return uncertainty_ce_loss_reference(mu, log_var, target, seed=seed, offset=offset, **kwargs)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
def test_ce_matches_reference_with_the_same_noise_float64(shape, bootstrap, route):
    B, C, H, W = shape
    mu, log_var, target, box_mask, pp = make_class_inputs(
        B,
        C,
        H,
        W,
        seed=_seed(shape),
        ignore_fraction=0.1,
        box_fraction=0.7,
        pixel_perfect=[b % 3 == 1 for b in range(B)],
    )
    kwargs = dict(
        samples=7,
        seed=99,
        tau=1.5,
        bootstrap=bootstrap,
        route_gradients=route,
        box_mask=box_mask,
        pixel_perfect=pp,
        reduction="none",
    )
    value, grad_mu, grad_s = value_and_grads(_ce, mu, log_var, target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_ce_ref, mu, log_var, target, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_reductions_match_reference(reduction):
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 4, 9, 8, seed=3, ignore_fraction=0.3, box_fraction=0.5)
    kwargs = dict(samples=5, seed=(11, 4), box_mask=box_mask, reduction=reduction)
    value, grad_mu, grad_s = value_and_grads(_ce, mu, log_var, target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_ce_ref, mu, log_var, target, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-10, atol=1e-12)
    per_pixel = _ce(mu, log_var, target, samples=5, seed=(11, 4), box_mask=box_mask, reduction="none")
    valid = (target != 255).sum()
    expected = per_pixel.sum() if reduction == "sum" else per_pixel.sum() / valid
    torch.testing.assert_close(value, expected)


def test_ce_is_the_log_of_the_mean_not_the_mean_of_the_logs():
    mu, log_var, target, _, _ = make_class_inputs(1, 5, 4, 4, seed=5, log_var_shift=1.0)
    T = 9
    eps = philox_normal(3, 0, T, 1, 5, 4, 4)
    log_p = (mu + torch.exp(0.5 * log_var) * eps).log_softmax(2).gather(2, target[None, :, None].expand(T, 1, 1, 4, 4))
    log_mean = -(log_p.squeeze(2).exp().mean(0)).log()
    mean_log = -log_p.squeeze(2).mean(0)
    loss = _ce(mu, log_var, target, samples=T, seed=3, bootstrap=False, reduction="none")
    torch.testing.assert_close(loss, log_mean, rtol=1e-12, atol=1e-12)
    assert (mean_log - loss).min() > 0  # Jensen: the mean of the logs is a different, larger loss
    # One sample: the two agree.
    one = _ce(mu, log_var, target, samples=1, seed=3, bootstrap=False, reduction="none")
    torch.testing.assert_close(one, -log_p[0].squeeze(1), rtol=1e-12, atol=1e-12)


def test_ce_flip_and_routing_by_hand():
    # Two pixels, three classes; pixel 0 has a variance above tau (flip to the
    # arg-max of mu, class 2), pixel 1 does not (keep y = 0).
    mu = torch.tensor([[[[0.1, 0.3]], [[-1.0, 0.0]], [[2.0, 0.2]]]], dtype=torch.float64)
    log_var = torch.tensor([[[[math.log(3.0), -1.0]], [[0.0, -2.0]], [[-1.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 0]]])
    kwargs = dict(samples=4, seed=1, tau=2.5, reduction="none")
    value, grad_mu, grad_s = value_and_grads(_ce, mu, log_var, target, **kwargs)
    no_boot, _, grad_s_no_boot = value_and_grads(_ce, mu, log_var, target, bootstrap=False, **kwargs)
    ce = torch.nn.functional.cross_entropy(mu, torch.tensor([[[2, 0]]]), reduction="none")
    torch.testing.assert_close(value, no_boot + ce)
    # Routed: mu learns only from CE(mu, y*), log_var only from L_u.
    x = mu.clone().requires_grad_()
    torch.nn.functional.cross_entropy(x, torch.tensor([[[2, 0]]]), reduction="none").mul(
        torch.rand(1, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ).sum().backward()
    torch.testing.assert_close(grad_mu, x.grad)
    torch.testing.assert_close(grad_s, grad_s_no_boot)


def test_ce_outside_boxes_and_pixel_perfect_is_plain_cross_entropy():
    mu, log_var, target, _, _ = make_class_inputs(2, 4, 5, 6, seed=7, ignore_fraction=0.2)
    box_mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    box_mask[1, 1:4, 2:5] = True
    pp = torch.tensor([False, True])
    value, grad_mu, grad_s = value_and_grads(
        _ce, mu, log_var, target, samples=6, seed=2, box_mask=box_mask, pixel_perfect=pp, reduction="none"
    )
    x = mu.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, target, ignore_index=255, reduction="none")
    weights = torch.rand(ce.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (ce * weights).sum().backward()
    torch.testing.assert_close(value, ce.detach())
    torch.testing.assert_close(grad_mu, x.grad)
    assert torch.all(grad_s == 0)
    assert torch.all(value[target == 255] == 0)


def test_ce_all_ignored_mean_is_zero_with_a_gradient():
    mu, log_var, _, _, _ = make_class_inputs(2, 3, 4, 4, seed=9)
    target = torch.full((2, 4, 4), 255)
    x = mu.clone().requires_grad_()
    s = log_var.clone().requires_grad_()
    loss = boxloss.uncertainty_ce_loss(x, s, target, seed=0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(x.grad == 0) and torch.all(s.grad == 0)


def test_ce_custom_ignore_index():
    mu, log_var, target, _, _ = make_class_inputs(1, 3, 4, 4, seed=13)
    target[0, 0] = -100
    kwargs = dict(samples=3, seed=4, ignore_index=-100, reduction="none")
    torch.testing.assert_close(_ce(mu, log_var, target, **kwargs), _ce_ref(mu, log_var, target, **kwargs))
    with pytest.raises(ValueError, match="target must hold class indices"):
        _ce(mu, log_var, target, samples=3, seed=4)  # -100 is not the ignore_index here


def test_ce_float32_close_to_float64_reference():
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 21, 9, 19, seed=17, box_fraction=0.8)
    kwargs = dict(samples=20, seed=5, box_mask=box_mask, reduction="none", route_gradients=False)
    value, grad_mu, grad_s = value_and_grads(_ce, mu.float(), log_var.float(), target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_ce_ref, mu, log_var, target, **kwargs)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_mu.double(), ref_mu, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_low_precision_runs_in_float32(dtype):
    mu, log_var, target, _, _ = make_class_inputs(2, 5, 6, 6, seed=19)
    value, grad_mu, grad_s = value_and_grads(
        _ce, mu.to(dtype), log_var.to(dtype), target, samples=8, seed=1, reduction="none"
    )
    exact, _, _ = value_and_grads(
        _ce, mu.to(dtype).float(), log_var.to(dtype).float(), target, samples=8, seed=1, reduction="none"
    )
    assert value.dtype == dtype and grad_mu.dtype == dtype and grad_s.dtype == dtype
    torch.testing.assert_close(value, exact.to(dtype))


def test_ce_seed_contract():
    mu, log_var, target, _, _ = make_class_inputs(2, 4, 5, 5, seed=23, log_var_shift=1.0)
    kwargs = dict(samples=6, reduction="none")
    first = value_and_grads(_ce, mu, log_var, target, seed=42, **kwargs)
    again = value_and_grads(_ce, mu, log_var, target, seed=42, **kwargs)
    other = value_and_grads(_ce, mu, log_var, target, seed=43, **kwargs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # An offset selects another stream; (seed, 0) is the seed alone.
    assert torch.equal(_ce(mu, log_var, target, seed=(42, 0), **kwargs), first[0])
    assert not torch.equal(_ce(mu, log_var, target, seed=(42, 1), **kwargs), first[0])
    torch.testing.assert_close(
        _ce(mu, log_var, target, seed=(42, 7), **kwargs),
        _ce_ref(mu, log_var, target, seed=(42, 7), **kwargs),
        rtol=1e-12,
        atol=1e-12,
    )
    # 64-bit seeds: 2^64 - 1 and -1 are the same key.
    assert torch.equal(_ce(mu, log_var, target, seed=2**64 - 1, **kwargs), _ce(mu, log_var, target, seed=-1, **kwargs))
    torch.testing.assert_close(
        _ce(mu, log_var, target, seed=2**63 + 5, **kwargs),
        _ce_ref(mu, log_var, target, seed=2**63 + 5, **kwargs),
        rtol=1e-12,
        atol=1e-12,
    )


def test_ce_seed_none_advances_torch_generator():
    mu, log_var, target, _, _ = make_class_inputs(1, 4, 5, 5, seed=29, log_var_shift=1.0)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        a = _ce(mu, log_var, target, reduction="none")
        b = _ce(mu, log_var, target, reduction="none")
        torch.manual_seed(0)
        c = _ce(mu, log_var, target, reduction="none")
    finally:
        torch.set_rng_state(state)
    assert torch.equal(a, c) and not torch.equal(a, b)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(
        _ce(mu, log_var, target, generator=g1, reduction="none"),
        _ce(mu, log_var, target, generator=g2, reduction="none"),
    )


def test_ce_deterministic_and_thread_independent():
    mu, log_var, target, box_mask, _ = make_class_inputs(3, 7, 23, 29, dtype=torch.float32, seed=31, box_fraction=0.6)
    kwargs = dict(samples=5, seed=8, box_mask=box_mask, reduction="none", route_gradients=False)
    threads = torch.get_num_threads()
    try:
        first = value_and_grads(_ce, mu, log_var, target, **kwargs)
        torch.set_num_threads(1)
        single = value_and_grads(_ce, mu, log_var, target, **kwargs)
    finally:
        torch.set_num_threads(threads)
    again = value_and_grads(_ce, mu, log_var, target, **kwargs)
    for run in (single, again):
        for a, b in zip(first, run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bootstrap", [True, False])
def test_ce_gradcheck_float64(bootstrap):
    # The true derivative: routing off (with routing, mu's gradient is by
    # design not the derivative of the loss; the reference tests cover it).
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 4, 3, 5, seed=37, box_fraction=0.6, pixel_perfect=[False, False]
    )
    # tau far from every max log-variance, so the flip is constant near the point.
    tau = math.exp(float(log_var.amax(1).median()) + 0.01)
    margin = (log_var.amax(1) - math.log(tau)).abs().min()
    assert margin > 1e-3
    mu.requires_grad_()
    log_var.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: boxloss.uncertainty_ce_loss(
            m,
            s,
            target,
            samples=5,
            seed=3,
            tau=tau,
            bootstrap=bootstrap,
            route_gradients=False,
            box_mask=box_mask,
            reduction="none",
        ),
        (mu, log_var),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


def test_ce_memory_does_not_grow_with_samples():
    mu, log_var, target, _, _ = make_class_inputs(2, 5, 8, 8, dtype=torch.float32, seed=41)
    saved = {}

    def saved_bytes(samples):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = mu.clone().requires_grad_()
        s = log_var.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = boxloss.uncertainty_ce_loss(x, s, target, samples=samples, seed=0)
        loss.backward()
        return total

    for T in (1, 20, 500):
        saved[T] = saved_bytes(T)
    assert saved[1] == saved[20] == saved[500], saved
    # Inputs and per-pixel values only: mu, log_var, target, seed, the sample
    # LSE (and the mean's scalar divisor).
    assert saved[20] <= 2 * mu.numel() * 4 + target.numel() * 8 + 16 + target.numel() * 4 + 64


def test_ce_monte_carlo_converges_to_the_binary_closed_form():
    # C = 2 with variance on the object class only: softmax(l)_1 = sigmoid(l_1 - l_0),
    # l_1 - l_0 ~ N(mu_1 - mu_0, sigma_1^2), so E[p_1] is Eq. 8's integral.
    # Many samples: the kernel's estimate within the closed form's known error
    # (the probit approximation of the logistic, below 0.02 in probability).
    diff = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 4.0, 1.0, 8.0], dtype=torch.float64)
    mu = torch.stack([torch.zeros(5, dtype=torch.float64), diff]).reshape(1, 2, 1, 5)
    log_var = torch.stack([torch.full((5,), -40.0, dtype=torch.float64), var.log()]).reshape(1, 2, 1, 5)
    target = torch.ones(1, 1, 5, dtype=torch.long)
    loss = boxloss.uncertainty_ce_loss(mu, log_var, target, samples=20000, seed=17, bootstrap=False, reduction="none")
    mc_p = torch.exp(-loss).flatten()
    closed_p = torch.sigmoid(diff / torch.sqrt(1 + math.pi * var / 8))
    assert (mc_p - closed_p).abs().max() < 0.02, (mc_p, closed_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_extreme_inputs_are_finite(dtype):
    # |mu| up to 1e4, log-variances in [-20, 20], 21 classes, every setting.
    C = 21
    g = torch.Generator().manual_seed(43)
    cases = []
    for mu_kind, lv_kind in itertools.product(["+1e4", "-1e4", "0", "mixed"], ["-20", "20", "mixed"]):
        mu = {
            "+1e4": torch.full((2, C, 6, 5), 1e4),
            "-1e4": torch.full((2, C, 6, 5), -1e4),
            "0": torch.zeros(2, C, 6, 5),
            "mixed": (torch.rand(2, C, 6, 5, generator=g) * 2 - 1) * 1e4,
        }[mu_kind]
        mu[:, 3] = -mu[:, 3]
        lv = {
            "-20": torch.full((2, C, 6, 5), -20.0),
            "20": torch.full((2, C, 6, 5), 20.0),
            "mixed": torch.rand(2, C, 6, 5, generator=g) * 40 - 20,
        }[lv_kind]
        cases.append((mu, lv))
    target = torch.randint(0, C, (2, 6, 5), generator=g)
    for (mu, lv), (bootstrap, route) in itertools.product(cases, [(True, True), (True, False), (False, True)]):
        value, grad_mu, grad_s = value_and_grads(
            _ce,
            mu.to(dtype),
            lv.to(dtype),
            target,
            samples=20,
            seed=1,
            bootstrap=bootstrap,
            route_gradients=route,
            reduction="none",
        )
        for t in (value, grad_mu, grad_s):
            assert torch.isfinite(t).all()


# ------------------------------------------------------------------ binary


def _bce(mu, log_var, target, box_mask=None, **kwargs):
    return boxloss.uncertainty_bce_loss(mu, log_var, target, box_mask, **kwargs)


def _bce_ref(mu, log_var, target, box_mask=None, **kwargs):
    return uncertainty_bce_loss_reference(mu, log_var, target, box_mask, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 1, 40), (2, 17, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("soft", [False, True])
def test_bce_matches_reference_float64(shape, bootstrap, route, soft):
    B, H, W = shape
    mu, log_var, target, box_mask, pp = make_binary_inputs(
        B, H, W, seed=_seed(shape, soft), soft=soft, pixel_perfect=[b == 1 for b in range(B)]
    )
    kwargs = dict(
        box_mask=box_mask,
        bootstrap=bootstrap,
        route_gradients=route,
        pixel_perfect=pp,
        tau=2.0,
        temperature=0.3,
        reduction="none",
    )
    value, grad_mu, grad_s = value_and_grads(_bce, mu, log_var, target, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(_bce_ref, mu, log_var, target, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-10, atol=1e-12)


def test_bce_accepts_channel_dimension_and_bool_target():
    mu, log_var, target, box_mask, _ = make_binary_inputs(2, 6, 6, seed=47)
    expected = _bce(mu, log_var, target, box_mask, reduction="none")
    got = _bce(mu[:, None], log_var[:, None], target.bool()[:, None], box_mask[:, None], reduction="none")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (2, 6, 6)


def test_bce_special_cases_by_hand():
    mu = torch.tensor([[[-1.5, 0.4, 2.0]]], dtype=torch.float64)
    y = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float64)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(mu, y, reduction="none")
    # Outside the boxes and on pixel-perfect images: plain BCE on mu.
    torch.testing.assert_close(
        _bce(mu, torch.zeros_like(mu), y, torch.zeros_like(y, dtype=torch.bool), reduction="none"), plain
    )
    torch.testing.assert_close(
        _bce(mu, torch.zeros_like(mu), y, None, pixel_perfect=torch.tensor([True]), reduction="none"), plain
    )
    # No variance and no bootstrapping: Eq. 9 is plain BCE.
    torch.testing.assert_close(_bce(mu, torch.full_like(mu, -60.0), y, None, bootstrap=False, reduction="none"), plain)
    # Huge variance: W = 0, L_b = BCE(mu, 1 - y) (the flipped target); no
    # variance: W = sigmoid(tau / 0.2), almost all BCE(mu, y).
    kappa = 1 / math.sqrt(1 + math.pi * math.exp(8.0) / 8)
    lu = torch.nn.functional.binary_cross_entropy_with_logits(mu * kappa, y, reduction="none")
    flipped = torch.nn.functional.binary_cross_entropy_with_logits(mu, 1 - y, reduction="none")
    torch.testing.assert_close(_bce(mu, torch.full_like(mu, 8.0), y, None, reduction="none"), lu + flipped)
    w = 1 / (1 + math.exp(-2.5 / 0.2))
    torch.testing.assert_close(
        _bce(mu, torch.full_like(mu, -60.0), y, None, reduction="none"), plain + w * plain + (1 - w) * flipped
    )


def test_bce_routing_by_hand():
    mu, log_var, target, _, _ = make_binary_inputs(2, 5, 5, seed=53)
    _, grad_mu, grad_s = value_and_grads(_bce, mu, log_var, target, reduction="none")
    # mu: the gradient of the bootstrapped BCE with W held fixed.
    w = torch.sigmoid((2.5 - log_var.exp()) / 0.2)
    soft = w * target + (1 - w) * (1 - target)
    weights = torch.rand(mu.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(grad_mu, weights * (torch.sigmoid(mu) - soft))
    # log_var: the gradient of L_u alone.
    _, _, grad_s_no_boot = value_and_grads(_bce, mu, log_var, target, bootstrap=False, reduction="none")
    torch.testing.assert_close(grad_s, grad_s_no_boot)


@pytest.mark.parametrize("bootstrap", [True, False])
def test_bce_gradcheck_float64(bootstrap):
    mu, log_var, target, box_mask, pp = make_binary_inputs(2, 4, 5, seed=59, soft=True, pixel_perfect=[False, True])
    mu.requires_grad_()
    log_var.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: boxloss.uncertainty_bce_loss(
            m, s, target, box_mask, bootstrap=bootstrap, route_gradients=False, pixel_perfect=pp, reduction="none"
        ),
        (mu, log_var),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


def test_bce_closed_form_against_monte_carlo():
    # Eq. 8 approximates E[sigmoid(l)], l ~ N(mu, sigma^2); its error is below
    # 0.02 in probability (the probit approximation of the logistic).
    g = torch.Generator().manual_seed(61)
    mu = torch.tensor([-4.0, -1.0, 0.0, 0.5, 2.0, 6.0], dtype=torch.float64)
    var = torch.tensor([0.1, 1.0, 9.0, 3.0, 0.5, 20.0], dtype=torch.float64)
    samples = mu + var.sqrt() * torch.randn(400000, 6, generator=g, dtype=torch.float64)
    mc = torch.sigmoid(samples).mean(0)
    closed = torch.sigmoid(mu / torch.sqrt(1 + math.pi * var / 8))
    assert (mc - closed).abs().max() < 0.02
    # ... and the loss uses that probability: L_u = BCE(E[p], y).
    y = torch.ones(1, 1, 6, dtype=torch.float64)
    lu = _bce(mu.view(1, 1, 6), var.log().view(1, 1, 6), y, None, bootstrap=False, reduction="none")
    torch.testing.assert_close(lu.flatten(), -closed.log())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_float_precision_and_extremes(dtype):
    mu, log_var, target, box_mask, _ = make_binary_inputs(2, 9, 13, seed=67, mu_scale=6.0)
    kwargs = dict(reduction="none", route_gradients=False)
    value, grad_mu, grad_s = value_and_grads(
        _bce, mu.to(dtype), log_var.to(dtype), target.to(dtype), box_mask, **kwargs
    )
    ref_value, ref_mu, ref_s = value_and_grads(_bce_ref, mu, log_var, target, box_mask, **kwargs)
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad_mu.double(), ref_mu, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=2e-5, atol=1e-6)
    for mu_value, lv_value in itertools.product([1e4, -1e4, 0.0], [-20.0, 0.0, 20.0]):
        for bootstrap, route in [(True, True), (True, False), (False, True)]:
            m = torch.full((1, 2, 2), mu_value, dtype=dtype)
            s = torch.full((1, 2, 2), lv_value, dtype=dtype)
            y = torch.tensor([[[0.0, 1.0], [0.5, 1.0]]], dtype=dtype)
            out = value_and_grads(_bce, m, s, y, None, bootstrap=bootstrap, route_gradients=route, reduction="none")
            for t in out:
                assert torch.isfinite(t).all(), (mu_value, lv_value, bootstrap, route)


# ------------------------------------------------------- void (binary)

BINARY_LOSSES = {
    "bce": (boxloss.uncertainty_bce_loss, uncertainty_bce_loss_reference),
    "l2": (boxloss.uncertainty_l2_loss, uncertainty_l2_loss_reference),
}


def _with_void(target, seed, fraction=0.3, value=255):
    g = torch.Generator().manual_seed(seed)
    void = torch.rand(target.shape, generator=g) < fraction
    return target.masked_fill(void, value), void


@pytest.mark.parametrize("loss", list(BINARY_LOSSES))
@pytest.mark.parametrize("ignore_index", [255, -1])
def test_binary_void_pixels_are_left_out_like_the_multi_class_loss(loss, ignore_index):
    fn, ref = BINARY_LOSSES[loss]
    mu, log_var, target, box_mask, pp = make_binary_inputs(
        3, 6, 7, seed=_seed(loss, ignore_index), soft=True, pixel_perfect=[False, True, False]
    )
    with_void, void = _with_void(target, 5, value=ignore_index)
    kwargs = dict(pixel_perfect=pp) | ({"route_gradients": False} if loss == "bce" else {})
    # per pixel: the reference where the target is known, 0 (and no gradient) at void pixels
    value, grad_mu, grad_s = value_and_grads(
        fn, mu, log_var, with_void, box_mask, reduction="none", ignore_index=ignore_index, **kwargs
    )
    ref_value, ref_mu, ref_s = value_and_grads(ref, mu, log_var, target, box_mask, reduction="none", **kwargs)
    keep = ~void
    torch.testing.assert_close(value[keep], ref_value[keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mu[keep], ref_mu[keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_s[keep], ref_s[keep], rtol=1e-10, atol=1e-12)
    assert torch.all(value[void] == 0) and torch.all(grad_mu[void] == 0) and torch.all(grad_s[void] == 0)
    # mean over the known pixels (as uncertainty_ce_loss's), sum over them
    mean = fn(mu, log_var, with_void, box_mask, ignore_index=ignore_index, **kwargs)
    torch.testing.assert_close(mean, ref_value[keep].mean(), rtol=1e-12, atol=0)
    total = fn(mu, log_var, with_void, box_mask, reduction="sum", ignore_index=ignore_index, **kwargs)
    torch.testing.assert_close(total, ref_value[keep].sum(), rtol=1e-12, atol=0)
    # without void pixels nothing changes
    torch.testing.assert_close(
        fn(mu, log_var, target, box_mask, **kwargs), ref(mu, log_var, target, box_mask, **kwargs).mean()
    )


@pytest.mark.parametrize("loss", list(BINARY_LOSSES))
def test_binary_all_void_mean_is_zero_with_a_zero_gradient(loss):
    fn, _ = BINARY_LOSSES[loss]
    mu, log_var, _, box_mask, _ = make_binary_inputs(2, 4, 4, seed=_seed("all void", loss))
    target = torch.full((2, 4, 4), 255.0, dtype=torch.float64)
    value, grad_mu, grad_s = value_and_grads(fn, mu, log_var, target, box_mask)
    assert value == 0 and torch.all(grad_mu == 0) and torch.all(grad_s == 0)


def test_binary_void_with_integer_targets_and_modules():
    mu, log_var, target, box_mask, pp = make_binary_inputs(2, 5, 6, seed=_seed("uint8 void"))
    labels = target.to(torch.uint8)
    labels[0, :2] = 255  # a VOC-style uint8 mask: 0 background, 1 object, 255 void
    expected = _bce(mu, log_var, labels.double(), box_mask, pixel_perfect=pp)
    torch.testing.assert_close(_bce(mu, log_var, labels, box_mask, pixel_perfect=pp), expected)
    torch.testing.assert_close(boxloss.UncertaintyBCELoss()(mu, log_var, labels, box_mask, pp), expected)
    torch.testing.assert_close(
        boxloss.UncertaintyL2Loss()(mu, log_var, labels, box_mask, pp),
        boxloss.uncertainty_l2_loss(mu, log_var, labels.double(), box_mask, pixel_perfect=pp),
    )
    assert "ignore_index=255" in repr(boxloss.UncertaintyBCELoss())
    assert "ignore_index=7" in repr(boxloss.UncertaintyL2Loss(ignore_index=7))
    labels[0, 0, 0] = 7  # neither a probability nor the ignore index
    with pytest.raises(ValueError, match="target must hold probabilities"):
        _bce(mu, log_var, labels, box_mask)


@pytest.mark.parametrize(
    "fn",
    [boxloss.uncertainty_bce_loss, boxloss.uncertainty_l2_loss, boxloss.UncertaintyBCELoss, boxloss.UncertaintyL2Loss],
)
@pytest.mark.parametrize(
    "ignore_index, error, message",
    [
        (1, ValueError, "must not be 0 or 1"),
        (0, ValueError, "must not be 0 or 1"),
        (255.0, TypeError, "ignore_index must be an int"),
        (True, TypeError, "ignore_index must be an int"),
    ],
)
def test_binary_bad_ignore_index(fn, ignore_index, error, message):
    mu, log_var, target, box_mask, _ = make_binary_inputs(1, 3, 3, seed=_seed("bad ignore"))
    with pytest.raises(error, match=message):
        if isinstance(fn, type):
            fn(ignore_index=ignore_index)
        else:
            fn(mu, log_var, target, box_mask, ignore_index=ignore_index)


# ------------------------------------------------------------------ L2


def test_l2_matches_reference_and_paper():
    mu, log_var, target, box_mask, pp = make_binary_inputs(3, 6, 7, seed=71, pixel_perfect=[False, True, False])
    kwargs = dict(pixel_perfect=pp, reduction="none")
    value, grad_mu, grad_s = value_and_grads(boxloss.uncertainty_l2_loss, mu, log_var, target, box_mask, **kwargs)
    ref_value, ref_mu, ref_s = value_and_grads(uncertainty_l2_loss_reference, mu, log_var, target, box_mask, **kwargs)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_mu, ref_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-12, atol=1e-12)
    # Eq. 3 with y = 0 (pixel-perfect) and y = 1 (box) at one pixel.
    m, s = torch.tensor([[[0.3]]], dtype=torch.float64), torch.tensor([[[0.7]]], dtype=torch.float64)
    pp_loss = boxloss.uncertainty_l2_loss(m, s, torch.zeros_like(m), pixel_perfect=torch.tensor([True]))
    box_loss = boxloss.uncertainty_l2_loss(m, s, torch.ones_like(m))
    torch.testing.assert_close(
        pp_loss + box_loss, torch.tensor(0.3**2 + (1 - 0.3) ** 2 / (2 * math.exp(0.7)) + 0.35, dtype=torch.float64)
    )
    for mu_value, lv_value in itertools.product([1e4, -1e4], [-20.0, 20.0]):
        out = value_and_grads(
            boxloss.uncertainty_l2_loss,
            torch.full((1, 2, 2), mu_value),
            torch.full((1, 2, 2), lv_value),
            torch.ones(1, 2, 2),
            reduction="none",
        )
        assert all(torch.isfinite(t).all() for t in out)


# -------------------------------------------------------- ops and compile


def _ce_op_args(seed=0):
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 5, 4, 6, seed=seed, ignore_fraction=0.2, box_fraction=0.5, pixel_perfect=[False, True]
    )
    return mu, log_var, target, box_mask, pp, torch.tensor([7, 2]), 4, 1.5


@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
def test_opcheck_ce(bootstrap, route):
    mu, log_var, target, box_mask, pp, seed, samples, tau = _ce_op_args(73)
    args = (
        mu.requires_grad_(),
        log_var.requires_grad_(),
        target,
        box_mask,
        pp,
        seed,
        samples,
        tau,
        bootstrap,
        route,
        255,
    )
    torch.library.opcheck(CE, args)
    loss, lse = CE(*args)
    grad = torch.rand_like(loss)
    torch.library.opcheck(
        CE_BACKWARD,
        (
            grad,
            mu.detach(),
            log_var.detach(),
            target,
            box_mask,
            pp,
            seed,
            lse.detach(),
            samples,
            tau,
            bootstrap,
            route,
            255,
        ),
    )


@pytest.mark.parametrize("bootstrap, route", [(True, True), (True, False), (False, True)])
def test_opcheck_bce(bootstrap, route):
    mu, log_var, target, box_mask, pp = make_binary_inputs(2, 5, 6, seed=79, pixel_perfect=[True, False])
    args = (mu, log_var, target, box_mask, pp, 2.5, 0.2, bootstrap, route)
    torch.library.opcheck(BCE, (mu.clone().requires_grad_(), log_var.clone().requires_grad_(), *args[2:]))
    torch.library.opcheck(BCE_BACKWARD, (torch.rand_like(mu), *args))


def test_torch_compile_fullgraph_matches_eager():
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 6, 8, 8, dtype=torch.float32, seed=83, box_fraction=0.5, pixel_perfect=[True, False]
    )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 8, 8, dtype=torch.float32, seed=89)
    bt, _ = _with_void(bt, 91, fraction=0.2)

    def step(m, s, bm, bs):
        ce = boxloss.uncertainty_ce_loss(
            m, s, target, samples=6, seed=(3, 1), box_mask=box_mask, pixel_perfect=pp, route_gradients=False
        )
        bce = boxloss.uncertainty_bce_loss(bm, bs, bt, bmask, pixel_perfect=pp)
        l2 = boxloss.uncertainty_l2_loss(bm, bs, bt, bmask)
        return ce * 2.0 + bce + l2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    eager_inputs = [t.clone().requires_grad_() for t in (mu, log_var, bmu, blv)]
    compiled_inputs = [t.clone().requires_grad_() for t in (mu, log_var, bmu, blv)]
    eager = step(*eager_inputs)
    result = compiled(*compiled_inputs)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_module_with_drawn_seed():
    module = boxloss.UncertaintyCELoss(samples=4)
    mu, log_var, target, _, _ = make_class_inputs(1, 3, 5, 5, dtype=torch.float32, seed=97)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    value = compiled(mu, log_var, target)
    assert torch.isfinite(value)
    torch.testing.assert_close(compiled(mu, log_var, target, seed=5), module(mu, log_var, target, seed=5))


def test_non_contiguous_inputs():
    mu, log_var, target, box_mask, _ = make_class_inputs(2, 5, 9, 10, seed=101, box_fraction=0.5)
    kwargs = dict(samples=3, seed=1, box_mask=box_mask, reduction="none", route_gradients=False)
    expected = value_and_grads(_ce, mu, log_var, target, **kwargs)
    got = value_and_grads(
        _ce,
        mu.to(memory_format=torch.channels_last),
        log_var.to(memory_format=torch.channels_last),
        target.transpose(1, 2).contiguous().transpose(1, 2),
        **dict(kwargs, box_mask=box_mask.transpose(1, 2).contiguous().transpose(1, 2)),
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    big = torch.zeros(2, 10, 9, 10, dtype=torch.float64)
    big[:, ::2] = mu
    got = value_and_grads(_ce, big[:, ::2], log_var, target, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 6, 7, seed=103)
    expected = value_and_grads(_bce, bmu, blv, bt, bmask, reduction="none")
    got = value_and_grads(
        _bce, bmu.transpose(1, 2).contiguous().transpose(1, 2), blv, bt[:, :, :], bmask, reduction="none"
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_modules_match_functions_and_repr():
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 4, 5, 5, seed=107, box_fraction=0.5, pixel_perfect=[False, True]
    )
    module = boxloss.UncertaintyCELoss(samples=3, tau=1.5, reduction="sum")
    torch.testing.assert_close(
        module(mu, log_var, target, box_mask, pp, seed=4),
        _ce(mu, log_var, target, samples=3, tau=1.5, reduction="sum", box_mask=box_mask, pixel_perfect=pp, seed=4),
    )
    assert "samples=3" in repr(module)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        boxloss.UncertaintyCELoss(generator=g1)(mu, log_var, target),
        boxloss.UncertaintyCELoss(generator=g2)(mu, log_var, target),
    )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 5, 5, seed=109)
    bce = boxloss.UncertaintyBCELoss(tau=2.0, route_gradients=False)
    torch.testing.assert_close(
        bce(bmu, blv, bt, bmask, pp), _bce(bmu, blv, bt, bmask, tau=2.0, pixel_perfect=pp, route_gradients=False)
    )
    assert "tau=2.0" in repr(bce)
    l2 = boxloss.UncertaintyL2Loss(reduction="none")
    torch.testing.assert_close(
        l2(bmu, blv, bt, bmask), boxloss.uncertainty_l2_loss(bmu, blv, bt, bmask, reduction="none")
    )
    with pytest.raises(ValueError, match="UncertaintyCELoss: samples"):
        boxloss.UncertaintyCELoss(samples=0)
    with pytest.raises(ValueError, match="UncertaintyBCELoss: temperature"):
        boxloss.UncertaintyBCELoss(temperature=0)


def test_docstring_examples_run():
    out = torch.randn(2, 2, 32, 32, requires_grad=True)
    target = torch.zeros(2, 32, 32)
    target[:, 8:24, 8:24] = 1
    boxloss.uncertainty_bce_loss(
        out[:, 0], out[:, 1], target, target.bool(), pixel_perfect=torch.tensor([True, False])
    ).backward()
    mu = torch.randn(2, 21, 32, 32, requires_grad=True)
    log_var = torch.full((2, 21, 32, 32), -2.0, requires_grad=True)
    target = torch.randint(0, 21, (2, 32, 32))
    boxloss.uncertainty_ce_loss(
        mu, log_var, target, samples=20, seed=0, box_mask=target > 0, pixel_perfect=torch.tensor([True, False])
    ).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_var.grad).all()


# ---------------------------------------------------------------- bad input


def _good_ce():
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 3, 4, 5, dtype=torch.float32, seed=113, box_fraction=0.5, pixel_perfect=[False, True]
    )
    return dict(mu=mu, log_var=log_var, target=target, box_mask=box_mask, pixel_perfect=pp, seed=0)


def _set(g, key, value):
    return dict(g, **{key: value})


CE_BAD_INPUTS = {
    "mu not a tensor": (lambda g: _set(g, "mu", [[1.0]]), TypeError, "mu must be a torch.Tensor"),
    "mu 3-D": (lambda g: _set(g, "mu", g["mu"][0]), ValueError, "mu must have shape"),
    "mu integer": (lambda g: _set(g, "mu", g["mu"].long()), TypeError, "mu must be float"),
    "mu empty": (lambda g: dict(g, mu=g["mu"][:, :0], log_var=g["log_var"][:, :0]), ValueError, "non-empty"),
    "log_var shape": (lambda g: _set(g, "log_var", g["log_var"][:, :2]), ValueError, "log_var must have the shape"),
    "log_var dtype": (lambda g: _set(g, "log_var", g["log_var"].double()), TypeError, "log_var must have the dtype"),
    "target float": (lambda g: _set(g, "target", g["target"].float()), TypeError, "target must be an integer"),
    "target bool": (lambda g: _set(g, "target", g["target"] > 0), TypeError, "target must be an integer"),
    "target shape": (lambda g: _set(g, "target", g["target"][:, :3]), ValueError, "target must have shape"),
    "target rank": (lambda g: _set(g, "target", g["target"][0]), ValueError, "target must have shape"),
    "target too large": (
        lambda g: _set(g, "target", g["target"].index_fill(2, torch.tensor([1]), 3)),
        ValueError,
        "target must hold class indices in \\[0, 2\\] or ignore_index \\(255\\)",
    ),
    "target negative": (
        lambda g: _set(g, "target", g["target"].index_fill(1, torch.tensor([0]), -1)),
        ValueError,
        "target must hold class indices",
    ),
    "box_mask not bool": (lambda g: _set(g, "box_mask", g["box_mask"].float()), TypeError, "box_mask must be a bool"),
    "box_mask shape": (lambda g: _set(g, "box_mask", g["box_mask"][:, :2]), ValueError, "box_mask must have shape"),
    "pixel_perfect shape": (
        lambda g: _set(g, "pixel_perfect", g["pixel_perfect"][:1]),
        ValueError,
        "pixel_perfect must have shape",
    ),
    "pixel_perfect not bool": (
        lambda g: _set(g, "pixel_perfect", g["pixel_perfect"].int()),
        TypeError,
        "pixel_perfect must be a bool",
    ),
    "pixel_perfect list": (lambda g: _set(g, "pixel_perfect", [True, False]), TypeError, "pixel_perfect must be"),
    "samples zero": (lambda g: _set(g, "samples", 0), ValueError, "samples must be >= 1"),
    "samples negative": (lambda g: _set(g, "samples", -3), ValueError, "samples must be >= 1"),
    "samples float": (lambda g: _set(g, "samples", 2.0), TypeError, "samples must be an int"),
    "samples huge": (lambda g: _set(g, "samples", 2**31), ValueError, "samples must be below"),
    "tau zero": (lambda g: _set(g, "tau", 0.0), ValueError, "tau must be a positive"),
    "tau nan": (lambda g: _set(g, "tau", float("nan")), ValueError, "tau"),
    "seed float": (lambda g: _set(g, "seed", 1.5), TypeError, "seed must be an int"),
    "seed too large": (lambda g: _set(g, "seed", 2**64), ValueError, "seed must lie in"),
    "seed bad offset": (lambda g: _set(g, "seed", (1, -1)), ValueError, "offset must lie in"),
    "seed triple": (lambda g: _set(g, "seed", (1, 2, 3)), ValueError, "pair"),
    "seed and generator": (lambda g: _set(g, "generator", torch.Generator()), ValueError, "not both"),
    "generator wrong type": (lambda g: dict(g, seed=None, generator=5), TypeError, "generator must be"),
    "ignore_index float": (lambda g: _set(g, "ignore_index", 255.0), TypeError, "ignore_index must be an int"),
    "bootstrap not bool": (lambda g: _set(g, "bootstrap", 1), TypeError, "bootstrap must be a bool"),
    "reduction unknown": (lambda g: _set(g, "reduction", "avg"), ValueError, "reduction must be one of"),
}


@pytest.mark.parametrize("case", list(CE_BAD_INPUTS), ids=list(CE_BAD_INPUTS))
def test_ce_bad_input_raises_clear_error(case):
    build, error, message = CE_BAD_INPUTS[case]
    kwargs = build(_good_ce())
    mu, log_var, target = kwargs.pop("mu"), kwargs.pop("log_var"), kwargs.pop("target")
    with pytest.raises(error, match=message):
        boxloss.uncertainty_ce_loss(mu, log_var, target, **kwargs)


def _good_bce():
    mu, log_var, target, box_mask, pp = make_binary_inputs(
        2, 4, 5, dtype=torch.float32, seed=127, pixel_perfect=[False, True]
    )
    return dict(mu=mu, log_var=log_var, target=target, box_mask=box_mask, pixel_perfect=pp)


BCE_BAD_INPUTS = {
    "mu 2-D": (lambda g: _set(g, "mu", g["mu"][0]), ValueError, "mu must have shape"),
    "mu two channels": (lambda g: _set(g, "mu", torch.stack([g["mu"]] * 2, 1)), ValueError, "mu must have shape"),
    "log_var shape": (lambda g: _set(g, "log_var", g["log_var"][:, :2]), ValueError, "log_var must have the shape"),
    "log_var dtype": (lambda g: _set(g, "log_var", g["log_var"].double()), TypeError, "log_var must have the dtype"),
    "target shape": (lambda g: _set(g, "target", g["target"][:1]), ValueError, "target must have the shape"),
    "target above one": (
        lambda g: _set(g, "target", g["target"] * 2),
        ValueError,
        "target must hold probabilities in \\[0, 1\\]",
    ),
    "target nan": (
        lambda g: _set(g, "target", g["target"].index_fill(2, torch.tensor([0]), float("nan"))),
        ValueError,
        "contains NaN",
    ),
    "box_mask shape": (lambda g: _set(g, "box_mask", g["box_mask"][:, 1:]), ValueError, "box_mask must have shape"),
    "pixel_perfect shape": (
        lambda g: _set(g, "pixel_perfect", torch.tensor([True])),
        ValueError,
        "pixel_perfect must have shape",
    ),
    "temperature zero": (lambda g: _set(g, "temperature", 0.0), ValueError, "temperature must be a positive"),
    "tau inf": (lambda g: _set(g, "tau", float("inf")), ValueError, "tau must be a finite"),
    "tau string": (lambda g: _set(g, "tau", "2"), TypeError, "tau must be a number"),
    "route not bool": (lambda g: _set(g, "route_gradients", None), TypeError, "route_gradients must be a bool"),
    "reduction unknown": (lambda g: _set(g, "reduction", "batchmean"), ValueError, "reduction must be one of"),
}


@pytest.mark.parametrize("case", list(BCE_BAD_INPUTS), ids=list(BCE_BAD_INPUTS))
def test_bce_bad_input_raises_clear_error(case):
    build, error, message = BCE_BAD_INPUTS[case]
    kwargs = build(_good_bce())
    mu, log_var, target, box_mask = (
        kwargs.pop("mu"),
        kwargs.pop("log_var"),
        kwargs.pop("target"),
        kwargs.pop("box_mask"),
    )
    with pytest.raises(error, match=message):
        boxloss.uncertainty_bce_loss(mu, log_var, target, box_mask, **kwargs)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: {**a, 0: a[0][0]}, ValueError, "mu must have shape"),
        (lambda a: {**a, 2: a[2].int()}, TypeError, "target must be an int64"),
        (lambda a: {**a, 5: torch.tensor([1, 2, 3])}, ValueError, "seed must be a CPU tensor of shape \\(2,\\)"),
        (lambda a: {**a, 5: torch.tensor([1.0, 2.0])}, TypeError, "seed must be an int64"),
        (lambda a: {**a, 5: torch.tensor([1, 2**40])}, ValueError, "offset must lie in"),
        (lambda a: {**a, 6: 0}, ValueError, "samples must be a positive"),
        (lambda a: {**a, 7: -1.0}, ValueError, "tau must be a positive"),
        (lambda a: {**a, 3: a[3][:, 1:]}, ValueError, "box_mask must have shape"),
        (lambda a: {**a, 2: a[2] + 10}, ValueError, "target must hold class indices"),
    ],
)
def test_raw_ce_op_rejects_bad_input_without_crashing(mutate, error, message):
    mu, log_var, target, box_mask, pp, seed, samples, tau = _ce_op_args(131)
    args = dict(enumerate([mu, log_var, target, box_mask, pp, seed, samples, tau, True, True, 255]))
    args = mutate(args)
    with pytest.raises(error, match=message):
        CE(*[args[i] for i in range(11)])


def test_raw_backward_ops_reject_bad_shapes():
    mu, log_var, target, box_mask, pp, seed, samples, tau = _ce_op_args(137)
    with pytest.raises(ValueError, match="grad must have shape"):
        CE_BACKWARD(
            torch.ones(3), mu, log_var, target, box_mask, pp, seed, torch.zeros(2, 4, 6), samples, tau, True, True, 255
        )
    with pytest.raises(ValueError, match="sample_lse must have shape"):
        CE_BACKWARD(
            torch.ones(2, 4, 6),
            mu,
            log_var,
            target,
            box_mask,
            pp,
            seed,
            torch.zeros(2, 4),
            samples,
            tau,
            True,
            True,
            255,
        )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 3, 3, seed=139)
    with pytest.raises(ValueError, match="grad must have shape"):
        BCE_BACKWARD(torch.ones(2, 3), bmu, blv, bt, bmask, None, 2.5, 0.2, True, True)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        BCE(bmu, blv, bt, bmask, None, 2.5, -0.2, True, True)


# ----------------------------------------------------------- fallback path


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))


def test_fallback_to_reference_matches_the_kernels():
    mu, log_var, target, box_mask, pp = make_class_inputs(
        2, 4, 5, 6, seed=149, box_fraction=0.5, pixel_perfect=[False, True], ignore_fraction=0.2
    )
    bmu, blv, bt, bmask, _ = make_binary_inputs(2, 5, 6, seed=151)
    expected_ce = _ce(mu, log_var, target, samples=5, seed=(3, 2), box_mask=box_mask, pixel_perfect=pp)
    expected_bce = _bce(bmu, blv, bt, bmask, pixel_perfect=pp)
    path = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"uncertainty_fallback_{os.getpid()}.pt")
    torch.save(
        dict(mu=mu, log_var=log_var, target=target, box_mask=box_mask, pp=pp, bmu=bmu, blv=blv, bt=bt, bmask=bmask),
        path,
    )
    code = (
        "import warnings, torch, boxloss\n"
        "assert not boxloss.extension_loaded()\n"
        f"d = torch.load({path!r})\n"
        "with warnings.catch_warnings(record=True):\n"
        "    warnings.simplefilter('always')\n"
        "    ce = boxloss.uncertainty_ce_loss(d['mu'], d['log_var'], d['target'], samples=5, seed=(3, 2),\n"
        "                                     box_mask=d['box_mask'], pixel_perfect=d['pp'])\n"
        "    bce = boxloss.uncertainty_bce_loss(d['bmu'], d['blv'], d['bt'], d['bmask'], pixel_perfect=d['pp'])\n"
        "print(repr(ce.item()), repr(bce.item()))\n"
    )
    try:
        result = _run_python(code, BOXLOSS_DISABLE_EXTENSION="1", BOXLOSS_REQUIRE_EXTENSION="0")
    finally:
        os.remove(path)
    assert result.returncode == 0, result.stderr
    ce, bce = map(float, result.stdout.split())
    assert ce == pytest.approx(expected_ce.item(), rel=1e-12)
    assert bce == pytest.approx(expected_bce.item(), rel=1e-12)


def test_cuda_kernels_are_registered_when_built_with_cuda():
    from boxloss import _build_info

    for op in (
        "uncertainty_ce_loss",
        "_uncertainty_ce_loss_backward",
        "uncertainty_bce_loss",
        "_uncertainty_bce_loss_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"boxloss::{op}", "CUDA") == bool(_build_info.WITH_CUDA)
