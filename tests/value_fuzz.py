"""Hypothesis helpers shared by the fuzz tests (tests/*_fuzz.py): values out of an argument's domain, huge values,
and the second-order property of every differentiable op.

- ``bad_values(domain)``: a strategy of corruptions for an argument whose values must be probabilities (NaN, +-Inf,
  values just outside [0, 1], huge values, logits in place of the whole tensor) or merely finite (NaN, +-Inf);
- ``corrupt(tensor, kind, index, seed)``: the tensor with that corruption;
- ``assert_rejected(names, argument, call)``: ``call()`` raises ValueError whose message starts with one of the
  function names and names the argument;
- ``hessian_vector_product(loss_fn, inputs, directions)``: the derivative of <grad, v> (double backward);
- ``directional_difference(loss_fn, inputs, directions)``: the same by central finite differences of the gradient.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import strategies as st

PROBABILITIES, FINITE = "probabilities", "finite"

NON_FINITE = ("nan", "inf", "-inf")
OUT_OF_UNIT = ("above_one", "below_zero", "huge", "-huge", "logits")


def bad_values(domain: str):
    kinds = NON_FINITE + (OUT_OF_UNIT if domain == PROBABILITIES else ())
    return st.sampled_from(kinds)


def corrupt(tensor: torch.Tensor, kind: str, index: int, seed: int = 0) -> torch.Tensor:
    """A copy of ``tensor`` with element ``index`` (modulo its size) replaced, or all of it for ``"logits"``."""
    if kind == "logits":
        g = torch.Generator().manual_seed(seed)
        logits = 4 * torch.randn(tensor.shape, generator=g, dtype=torch.float64)
        # At least one logit outside [0, 1] even for a tensor of one element.
        logits.view(-1)[index % logits.numel()] = 2.5
        return logits.to(tensor.dtype)
    value = {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "above_one": 1.0 + 1e-6,
        "below_zero": -1e-6,
        "huge": 1e30,
        "-huge": -1e30,
    }[kind]
    out = tensor.clone(memory_format=torch.contiguous_format)
    out.view(-1)[index % out.numel()] = value
    return out


def assert_rejected(names, argument: str, call) -> None:
    """call() raises ValueError starting '<one of names>: <argument> must'."""
    names = (names,) if isinstance(names, str) else tuple(names)
    pattern = rf"^({'|'.join(re.escape(n) for n in names)}): {re.escape(argument)} must"
    with pytest.raises(ValueError, match=pattern):
        call()


def hessian_vector_product(loss_fn, inputs, directions):
    """d/dx <d loss/dx, v>: the double backward of loss_fn at inputs along directions (None where it is 0)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*inputs)
    if not loss.requires_grad:  # e.g. no box, or no pair of neighbours: a constant
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    inner = sum((g * v).sum() for g, v in zip(grads, directions) if g is not None and g.requires_grad)
    if not torch.is_tensor(inner) or not inner.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    out = torch.autograd.grad(inner, inputs, allow_unused=True)
    return [torch.zeros_like(x) if h is None else h for x, h in zip(inputs, out)]


def directional_difference(loss_fn, inputs, directions, eps: float = 1e-6):
    """(grad(x + eps v) - grad(x - eps v)) / (2 eps): the Hessian-vector product by finite differences."""

    def gradient(shift):
        xs = [(x + shift * v).detach().requires_grad_() for x, v in zip(inputs, directions)]
        loss = loss_fn(*xs)
        if not loss.requires_grad:
            return [torch.zeros_like(x) for x in xs]
        gs = torch.autograd.grad(loss, xs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]

    plus, minus = gradient(eps), gradient(-eps)
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


def assert_close_products(analytic, numeric, *, rtol=1e-4, atol=1e-6) -> None:
    for a, n in zip(analytic, numeric):
        scale = max(1.0, n.abs().max().item())
        assert (a - n).abs().max().item() <= rtol * scale + atol, (a - n).abs().max().item()
