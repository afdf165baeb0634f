"""boxloss._pydensecrf: the one import of pydensecrf, its check of the installed build, and its errors.

Fake pydensecrf modules stand in for builds made with different Cythons (the
enums as module-level integers, as enum classes only, or neither) and for
broken builds; the last tests run the installed pydensecrf, where there is one.
"""

import enum
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch

from boxloss import _pydensecrf
from boxloss.recipes import baselines
from boxloss.reference.bilateral import original_lattice_filter

NAMES = {name: value for values in _pydensecrf.DOCUMENTED_VALUES.values() for name, value in values.items()}


@pytest.fixture(autouse=True)
def fresh_check():
    _pydensecrf._load.cache_clear()
    yield
    _pydensecrf._load.cache_clear()


def _unary_from_softmax(probs):
    probs = np.asarray(probs, np.float32)
    return -np.log(np.clip(probs, 1e-5, None)).reshape(probs.shape[0], -1)


class _FakeDenseCRF:
    """Records the pairwise calls; inference returns the softmax of the negative unary."""

    calls: ClassVar[list] = []  # each fake from _install_fake has its own
    marginals = None  # overrides what inference returns

    def __init__(self, nvar, nlabels):
        self.nvar, self.nlabels = nvar, nlabels

    def setUnaryEnergy(self, unary):
        assert unary.shape == (self.nlabels, self.nvar)
        self.unary = np.asarray(unary, np.float64)

    def addPairwiseEnergy(self, features, compat, kernel=1, normalization=3):  # pydensecrf's defaults
        type(self).calls.append(("energy", kernel, normalization))

    def inference(self, iterations):
        if type(self).marginals is not None:
            return type(self).marginals
        e = np.exp(-(self.unary - self.unary.min(0)))
        return (e / e.sum(0)).astype(np.float32)


class _FakeDenseCRF2D(_FakeDenseCRF):
    def __init__(self, w, h, nlabels):
        super().__init__(w * h, nlabels)

    def addPairwiseGaussian(self, sxy, compat, kernel=1, normalization=3):
        type(self).calls.append(("gaussian", kernel, normalization))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=1, normalization=3):
        type(self).calls.append(("bilateral", kernel, normalization))


def _install_fake(monkeypatch, *, constants, densecrf_importable=True, marginals=None):
    """pydensecrf, pydensecrf.densecrf and pydensecrf.utils as fakes in sys.modules."""
    calls = []
    crf2d = type("DenseCRF2D", (_FakeDenseCRF2D,), {"calls": calls, "marginals": marginals})
    crf = type("DenseCRF", (_FakeDenseCRF,), {"calls": calls, "marginals": marginals})
    densecrf = types.ModuleType("pydensecrf.densecrf")
    densecrf.__file__ = "/fake/pydensecrf/densecrf.so"
    densecrf.DenseCRF, densecrf.DenseCRF2D = crf, crf2d
    if constants == "module":  # as Cython 0.29 builds it
        for name, value in NAMES.items():
            setattr(densecrf, name, value)
    if constants in ("module", "enum classes"):  # Cython 3 builds only these
        for enum_name, values in _pydensecrf.DOCUMENTED_VALUES.items():
            setattr(densecrf, enum_name, enum.IntEnum(enum_name, values))
    utils = types.ModuleType("pydensecrf.utils")
    utils.unary_from_softmax = _unary_from_softmax
    package = types.ModuleType("pydensecrf")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "pydensecrf", package)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", densecrf if densecrf_importable else None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", utils)
    return calls


@pytest.mark.parametrize("constants", ["module", "enum classes", "none"])
def test_every_build_gets_the_header_values(monkeypatch, constants):
    calls = _install_fake(monkeypatch, constants=constants)
    crf = _pydensecrf.load("test")
    for name, value in NAMES.items():
        assert getattr(crf, name) == value and type(getattr(crf, name)) is int, name
    # The check ran the build with plain integers: DIAG kernels, symmetric
    # normalisation for the 2D terms and none for the raw energy.
    assert calls == [("gaussian", 1, 3), ("bilateral", 1, 3), ("energy", 1, 0)]


def test_the_values_a_build_exports_take_precedence(monkeypatch):
    _install_fake(monkeypatch, constants="none")
    sys.modules["pydensecrf.densecrf"].KernelType = enum.IntEnum("KernelType", {"DIAG_KERNEL": 7})
    sys.modules["pydensecrf.densecrf"].NO_NORMALIZATION = 5
    crf = _pydensecrf.load("test")
    assert (crf.DIAG_KERNEL, crf.NO_NORMALIZATION, crf.CONST_KERNEL) == (7, 5, 0)


def test_a_build_without_the_constants_runs_the_callers(monkeypatch):
    _install_fake(monkeypatch, constants="none")
    image = np.zeros((6, 8, 3), np.uint8)
    masks = baselines.dense_crf_box_masks(image, np.array([[1.0, 1.0, 5.0, 4.0]]), [1], num_classes=1)
    assert masks.shape == (1, 6, 8) and masks.any()
    values = torch.rand(2, 3, 4, dtype=torch.float64) + 0.1
    out = original_lattice_filter(values, torch.zeros(3, 3, 4), 5.0, 15.0)
    assert out.shape == (2, 3, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "marginals, what",
    [
        (np.full((2, 4), np.nan, np.float32), "not finite probabilities"),
        (np.full((2, 4), 0.9, np.float32), "not finite probabilities"),
        (np.full((3, 4), 1 / 3, np.float32), "shape"),
    ],
)
def test_a_build_that_gives_no_marginals_is_reported(monkeypatch, marginals, what):
    _install_fake(monkeypatch, constants="none", marginals=marginals)
    with pytest.raises(_pydensecrf.PyDenseCRFUnavailable, match=what) as info:
        _pydensecrf.load("dense_crf_box_masks")
    message = str(info.value)
    assert message.startswith("dense_crf_box_masks: the installed pydensecrf (/fake/pydensecrf/densecrf.so) failed")
    assert _pydensecrf.REINSTALL in message and info.value.installed


def test_a_build_that_raises_is_reported_and_checked_again(monkeypatch):
    _install_fake(monkeypatch, constants="none")

    def broken(self, *args, **kwargs):
        raise AttributeError("module 'pydensecrf.densecrf' has no attribute 'DIAG_KERNEL'")

    monkeypatch.setattr(_FakeDenseCRF2D, "addPairwiseGaussian", broken)
    with pytest.raises(_pydensecrf.PyDenseCRFUnavailable, match="AttributeError: module 'pydensecrf.densecrf'"):
        _pydensecrf.load("bana_pseudo_labels")
    monkeypatch.undo()
    _install_fake(monkeypatch, constants="none")
    assert _pydensecrf.load("bana_pseudo_labels").DIAG_KERNEL == 1  # a failure is not cached


def test_a_compiled_module_that_does_not_import_is_reported(monkeypatch):
    _install_fake(monkeypatch, constants="module", densecrf_importable=False)
    with pytest.raises(_pydensecrf.PyDenseCRFUnavailable, match="installed but its compiled module does not import"):
        original_lattice_filter(torch.ones(1, 2, 2, dtype=torch.float64), torch.zeros(3, 2, 2), 5.0, 15.0)


def test_a_missing_pydensecrf_is_an_import_error_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="^dense_crf_box_masks: pydensecrf .* is not installed") as info:
        baselines.dense_crf_box_masks(
            np.zeros((4, 4, 3), np.uint8), np.array([[0.0, 0.0, 2.0, 2.0]]), [1], num_classes=1
        )
    assert isinstance(info.value, _pydensecrf.PyDenseCRFUnavailable) and not info.value.installed
    assert _pydensecrf.REINSTALL in str(info.value)


def test_bad_input_is_reported_before_pydensecrf_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    with pytest.raises(ValueError, match="labels must lie"):
        baselines.dense_crf_box_masks(
            np.zeros((4, 4, 3), np.uint8), np.array([[0.0, 0.0, 2.0, 2.0]]), [3], num_classes=1
        )


def test_the_installed_build_passes_and_agrees_with_the_header():
    pytest.importorskip("pydensecrf")  # a dependency of boxloss; absent only from hand-made environments
    crf = _pydensecrf.load("test")
    from pydensecrf import densecrf

    for enum_name, values in _pydensecrf.DOCUMENTED_VALUES.items():
        for name, value in values.items():
            if hasattr(densecrf, name):
                assert int(getattr(densecrf, name)) == value, name
            if hasattr(densecrf, enum_name):
                assert int(getattr(getattr(densecrf, enum_name), name)) == value, (enum_name, name)
            assert getattr(crf, name) == value
