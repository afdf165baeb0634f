"""Loading of the compiled ops (boxloss._C).

The ops live in the PyTorch dispatcher as ``torch.ops.boxloss.*``.  Each module
of :mod:`boxloss.ops` registers the fake (meta) kernels and autograd formulas
of its ops from Python, and only when :func:`extension_loaded` says ``_C`` has
loaded, so a failed build gives one actionable message here instead of an
error deep inside a registration.

Without ``_C`` the public functions fall back to the pure-PyTorch reference
implementations (:mod:`boxloss._fallback`) after warning once; set
``BOXLOSS_REQUIRE_EXTENSION=1`` to make that an error instead (the test suite
does).  ``BOXLOSS_DISABLE_EXTENSION=1`` skips loading ``_C`` (to compare
against, or to work around a broken build).
"""

from __future__ import annotations

import os
import warnings

import torch

_LOAD_ERROR: str | None = None
_WARNED = False


def _build_info():
    try:
        from boxloss import _build_info
    except ImportError:
        return None
    return _build_info


def _load() -> str | None:
    """Imports boxloss._C; returns None on success, else the reason it failed."""
    if os.environ.get("BOXLOSS_DISABLE_EXTENSION", "") not in ("", "0"):
        return "the compiled ops were disabled by BOXLOSS_DISABLE_EXTENSION (unset it to use them)"
    info = _build_info()
    if info is None:
        return (
            "boxloss has not been built in this location (boxloss/_build_info.py is missing). "
            "Build it with:  pip install --no-build-isolation -e .   (from the boxloss checkout)"
        )
    if info.TORCH_VERSION != torch.__version__:
        return (
            f"boxloss._C was built against torch {info.TORCH_VERSION}, but torch {torch.__version__} "
            "is installed; a binary built for another torch can crash, so it was not loaded. "
            "Rebuild it against the installed torch:  "
            "pip install --no-build-isolation --force-reinstall --no-deps <path to boxloss>"
        )
    try:
        from boxloss import _C  # noqa: F401  (importing registers the ops)
    except (ImportError, OSError) as exc:
        return (
            f"boxloss._C failed to load ({exc}). Rebuild it against the installed torch "
            f"{torch.__version__}:  pip install --no-build-isolation --force-reinstall --no-deps "
            "<path to boxloss>"
        )
    return None


def extension_loaded() -> bool:
    """True when the compiled CPU (and, if built, CUDA) kernels are in use."""
    return _LOAD_ERROR is None


def extension_error() -> str | None:
    """Why boxloss._C is not loaded, with the command that fixes it; None when loaded."""
    return _LOAD_ERROR


def cuda_kernels_built() -> bool:
    """True when boxloss._C contains CUDA kernels."""
    info = _build_info()
    return bool(extension_loaded() and info is not None and info.WITH_CUDA)


def warn_fallback(op: str) -> None:
    """Called by :mod:`boxloss._fallback` before it runs a reference implementation."""
    global _WARNED
    if os.environ.get("BOXLOSS_REQUIRE_EXTENSION", "") not in ("", "0"):
        raise RuntimeError(f"boxloss.{op}: the compiled ops are required but unavailable: {_LOAD_ERROR}")
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"boxloss is running its slow pure-PyTorch reference implementations: {_LOAD_ERROR}",
            RuntimeWarning,
            stacklevel=4,
        )


_LOAD_ERROR = _load()
