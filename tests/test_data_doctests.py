"""The runnable examples in the boxloss.data docstrings stay runnable."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "boxloss.data",
    "boxloss.data.sample",
    "boxloss.data.synthetic",
    "boxloss.data.voc",
    "boxloss.data.coco",
    "boxloss.data.stats",
    "boxloss.data.transforms",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
