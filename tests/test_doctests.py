"""The docstring examples, run as doctests, so that the documentation stays true.

Every module of the ``noxton`` package is collected (the layers' ``Example:``
blocks live in ``noxton/nn`` and ``noxton/haiku``); a module whose docstrings
hold no example is a test with nothing to check. The examples run under this
suite's strict dtype and rank promotion (see ``conftest.py``).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest
from helpers import torch

import noxton

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(noxton.__path__, prefix="noxton.") if m.name != "noxton.__main__"
)

# The modules whose examples the documentation shows: they must have some.
DOCUMENTED = [
    "noxton.nn._attention",
    "noxton.nn._squeeze_excitation",
    "noxton.haiku._attention",
    "noxton.haiku._squeeze_excitation",
    "noxton.haiku._transformer",
    "noxton.nn._transformer",
]

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _finder_tests(module):
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def _needs_torch(test):
    return any(re.search(r"^import .*\btorch\b", ex.source) for ex in test.examples)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    tests = _finder_tests(module)
    if torch is None:  # examples that port a torch module run where torch is installed
        tests = [t for t in tests if not _needs_torch(t)]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples failed in {name}"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_modules_have_examples(name):
    assert _finder_tests(importlib.import_module(name)), f"{name} lost its docstring example"
