"""Argument checks shared by the public functions.

They read only shapes, dtypes, devices and Python values, so they run unchanged
under torch.compile without breaking the graph.  Each message names the
function, the argument and what it got.

The one exception is :func:`check_values`, which reads the values of the
tensor arguments of the plain-PyTorch losses (the fused ops check values in
their kernels instead): it runs in eager mode only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(fn: str, name: str, value, *, dim: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{fn}: {name} must have shape {layout}, got shape {tuple(value.shape)}")
    return value


def check_float_dtype(fn: str, name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def check_same(fn: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *, what: str) -> None:
    a = getattr(value, what)
    b = getattr(ref, what)
    if a != b:
        raise (TypeError if what == "dtype" else ValueError)(
            f"{fn}: {name} must have the {what} of {ref_name} ({b}), got {a}"
        )


def check_positive(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {value}")
    return value


def check_int(fn: str, name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def check_choice(fn: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def normalise_channels(fn: str, channels, num_channels: int) -> list[int] | None:
    """None (every channel) or a non-empty list of distinct indices in [0, C)."""
    if channels is None:
        return None
    if isinstance(channels, torch.Tensor):
        if channels.dim() != 1 or channels.dtype.is_floating_point or channels.dtype == torch.bool:
            raise TypeError(f"{fn}: channels must be a 1-D integer tensor or a sequence of ints, got {channels!r}")
        channels = channels.tolist()
    if isinstance(channels, int) and not isinstance(channels, bool):
        channels = [channels]
    if not isinstance(channels, Iterable) or isinstance(channels, (str, bytes)):
        raise TypeError(f"{fn}: channels must be None or a sequence of ints, got {type(channels).__name__}")
    out: list[int] = []
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"{fn}: channels must hold ints, got {c!r}")
        if not -num_channels <= c < num_channels:
            raise ValueError(
                f"{fn}: channels must lie in [{-num_channels}, {num_channels - 1}] for probs with "
                f"{num_channels} channels, got {c}"
            )
        c = c % num_channels
        if c in out:
            raise ValueError(f"{fn}: channels must not repeat a channel, got {list(channels)}")
        out.append(c)
    if not out:
        raise ValueError(f"{fn}: channels must name at least one channel, got []")
    return out


def reduce_per_image(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' averages over the batch (B > 0 is checked), 'sum' adds, 'none' keeps (B,)."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


PROBABILITIES = "probabilities"
FINITE = "finite"


def check_values(fn: str, **arguments: tuple[torch.Tensor, str]) -> None:
    """Raises ValueError for the first argument whose values are out of their domain.

    Each keyword is an argument name bound to ``(tensor, domain)`` (empty tensors pass), the domain
    :data:`PROBABILITIES` (every value in [0, 1]: NaN, Inf and logits fail)
    or :data:`FINITE` (no NaN or Inf).  One min/max pass per tensor, with no
    tensor-sized temporary, and one device-to-host copy for all of them (a
    synchronisation on CUDA).  A compiled graph cannot branch on values
    without breaking, so inside ``torch.compile`` the check is skipped: there
    the values are the caller's responsibility.
    """
    if torch.compiler.is_compiling():
        return
    bounds = []
    with torch.no_grad():
        arguments = {name: value for name, value in arguments.items() if value[0].numel() > 0}
        for tensor, _ in arguments.values():
            low, high = torch.aminmax(tensor.detach().reshape(-1))
            bounds.append(torch.stack([low, high]).to(torch.float64))
    if not bounds:
        return
    for (name, (tensor, domain)), (low, high) in zip(arguments.items(), torch.stack(bounds).tolist()):
        if domain == PROBABILITIES:
            if low >= 0 and high <= 1:
                continue
            raise ValueError(
                f"{fn}: {name} must hold probabilities in [0, 1], but it contains {_describe(tensor, low, high)}"
                "; pass softmax or sigmoid outputs, not logits"
            )
        if domain != FINITE:
            raise AssertionError(f"unknown domain {domain!r}")
        if math.isfinite(low) and math.isfinite(high):
            continue
        raise ValueError(f"{fn}: {name} must be finite, but it contains {_describe(tensor, low, high)}")


def _describe(tensor: torch.Tensor, low: float, high: float) -> str:
    """What is wrong with a tensor whose minimum is ``low`` and maximum ``high``: NaN, Inf or the range."""
    if math.isnan(low) or math.isnan(high):
        return "NaN"
    if low == -math.inf and high == math.inf:
        return "-Inf and Inf"
    if low == -math.inf or high == -math.inf:
        return "-Inf"
    if high == math.inf or low == math.inf:
        return "Inf"
    return f"values outside [0, 1] (min {low:.6g}, max {high:.6g})"
