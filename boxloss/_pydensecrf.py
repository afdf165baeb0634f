"""The one place boxloss imports pydensecrf, Krähenbühl's DenseCRF (the ``pydensecrf2`` distribution).

pydensecrf is a Cython extension built from source on the user's machine, and
what it exposes depends on the Cython that built it: Cython 0.29 and 3.0 export
the C++ enums ``KernelType`` and ``NormalizationType`` both as enum classes and
as module-level integers (``DIAG_KERNEL``, ``NO_NORMALIZATION``, ...), Cython 3.1
and later only as enum classes.  Every build accepts plain integers, so boxloss
passes those: the values the installed build exports where it exports them,
otherwise the values of the enums in pydensecrf's ``densecrf/include/pairwise.h``
(default C++ numbering, in declaration order).

:func:`load` imports pydensecrf once, checks that the installed build runs (a
2 x 2 DenseCRF2D inference with both pairwise terms and a raw
``addPairwiseEnergy`` must give finite marginals that sum to one) and returns
what boxloss uses.  A missing or unusable pydensecrf raises
:class:`PyDenseCRFUnavailable`, an ``ImportError`` that says what failed and
the command that fixes it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# pydensecrf's densecrf/include/pairwise.h:
#   enum KernelType { CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL };
#   enum NormalizationType { NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC };
DOCUMENTED_VALUES = {
    "KernelType": {"CONST_KERNEL": 0, "DIAG_KERNEL": 1, "FULL_KERNEL": 2},
    "NormalizationType": {"NO_NORMALIZATION": 0, "NORMALIZE_BEFORE": 1, "NORMALIZE_AFTER": 2, "NORMALIZE_SYMMETRIC": 3},
}

REINSTALL = "pip install --force-reinstall --no-deps --no-cache-dir pydensecrf2"
_REINSTALL_WHY = (
    "(with pip's default build isolation, which builds it with the Cython 0.29 that pydensecrf2 pins; "
    "--no-cache-dir keeps pip from reusing a wheel it built before)"
)


class PyDenseCRFUnavailable(ImportError):
    """pydensecrf is not installed (``installed`` False) or its build does not run (``installed`` True)."""

    def __init__(self, message: str, *, installed: bool):
        super().__init__(message)
        self.installed = installed


@dataclass(frozen=True)
class PyDenseCRF:
    """The parts of pydensecrf that boxloss uses, from a build that passed the check."""

    DenseCRF: Any
    DenseCRF2D: Any
    unary_from_softmax: Callable
    CONST_KERNEL: int
    DIAG_KERNEL: int
    FULL_KERNEL: int
    NO_NORMALIZATION: int
    NORMALIZE_BEFORE: int
    NORMALIZE_AFTER: int
    NORMALIZE_SYMMETRIC: int


def _enum_value(densecrf, enum: str, name: str) -> int:
    """``densecrf.<name>`` (Cython 0.29), else ``densecrf.<enum>.<name>`` (Cython 3), else the header's value."""
    if hasattr(densecrf, name):
        return int(getattr(densecrf, name))
    enum_class = getattr(densecrf, enum, None)
    if enum_class is not None and hasattr(enum_class, name):
        return int(getattr(enum_class, name))
    return DOCUMENTED_VALUES[enum][name]


def _wrap(densecrf, unary_from_softmax) -> PyDenseCRF:
    values = {name: _enum_value(densecrf, enum, name) for enum, names in DOCUMENTED_VALUES.items() for name in names}
    return PyDenseCRF(
        DenseCRF=densecrf.DenseCRF, DenseCRF2D=densecrf.DenseCRF2D, unary_from_softmax=unary_from_softmax, **values
    )


def _check_inference(crf: PyDenseCRF) -> None:
    """Raises (any exception) unless a tiny inference on the build runs and gives marginals."""
    probs = np.array([[0.8, 0.6, 0.4, 0.3], [0.2, 0.4, 0.6, 0.7]], np.float32)  # (labels, pixels), 2 x 2 image
    image = np.array([[[0, 0, 0], [10, 10, 10]], [[200, 200, 200], [255, 255, 255]]], np.uint8)
    model = crf.DenseCRF2D(2, 2, 2)
    model.setUnaryEnergy(np.ascontiguousarray(crf.unary_from_softmax(probs)))
    model.addPairwiseGaussian(sxy=1.0, compat=3.0, kernel=crf.DIAG_KERNEL, normalization=crf.NORMALIZE_SYMMETRIC)
    model.addPairwiseBilateral(
        sxy=1.0,
        srgb=20.0,
        rgbim=image,
        compat=np.array([-1.0, -1.0], np.float32),
        kernel=crf.DIAG_KERNEL,
        normalization=crf.NORMALIZE_SYMMETRIC,
    )
    features = np.array([[0, 1, 0, 1], [0, 0, 1, 1]], np.float32)  # (feature, pixel), the pixel positions
    model.addPairwiseEnergy(features, compat=1.0, kernel=crf.DIAG_KERNEL, normalization=crf.NO_NORMALIZATION)
    q = np.array(model.inference(3), dtype=np.float64)
    if q.shape != (2, 4):
        raise ValueError(f"inference returned marginals of shape {q.shape}, expected (2, 4)")
    if not np.isfinite(q).all() or (q < 0).any() or np.abs(q.sum(0) - 1).max() > 1e-4:
        raise ValueError(f"inference returned marginals that are not finite probabilities: {q.tolist()}")


@functools.lru_cache(maxsize=1)
def _load() -> PyDenseCRF:
    try:
        densecrf = importlib.import_module("pydensecrf.densecrf")
        utils = importlib.import_module("pydensecrf.utils")
    except ImportError as exc:
        try:
            importlib.import_module("pydensecrf")
        except ImportError:
            raise PyDenseCRFUnavailable(
                f"pydensecrf (Krähenbühl's DenseCRF, from the pydensecrf2 distribution) is not installed ({exc}). "
                f"Install it with:  {REINSTALL}  {_REINSTALL_WHY}",
                installed=False,
            ) from exc
        raise PyDenseCRFUnavailable(
            f"pydensecrf is installed but its compiled module does not import ({type(exc).__name__}: {exc}). "
            f"Rebuild it with:  {REINSTALL}  {_REINSTALL_WHY}",
            installed=True,
        ) from exc
    try:
        crf = _wrap(densecrf, utils.unary_from_softmax)
        _check_inference(crf)
    except Exception as exc:  # whatever the build does wrong, the message says what
        where = getattr(densecrf, "__file__", None) or "pydensecrf.densecrf"
        raise PyDenseCRFUnavailable(
            f"the installed pydensecrf ({where}) failed a 2 x 2 DenseCRF2D inference "
            f"({type(exc).__name__}: {exc}). Rebuild it with:  {REINSTALL}  {_REINSTALL_WHY}",
            installed=True,
        ) from exc
    return crf


def load(fn: str) -> PyDenseCRF:
    """pydensecrf, checked once per process; ``fn`` (the caller) starts the message of the error.

    Raises :class:`PyDenseCRFUnavailable` when pydensecrf is missing or unusable;
    a failed check is retried on the next call.
    """
    try:
        return _load()
    except PyDenseCRFUnavailable as exc:
        raise PyDenseCRFUnavailable(f"{fn}: {exc}", installed=exc.installed) from exc.__cause__
