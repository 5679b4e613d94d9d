"""Runs the docstring examples of the core modules (skipped only for modules not yet written)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util

import pytest

MODULES = (
    "hessjax.hvp",
    "hessjax.partition",
    "hessjax.estimators",
    "hessjax.measures",
    "hessjax.bounds",
    "hessjax.losses",
    "hessjax.noise",
    "hessjax.transforms",
)
# Modules that must have at least one example (the others should, but may be in progress).
REQUIRED = ("hessjax.hvp", "hessjax.partition")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} does not exist yet")
    module = importlib.import_module(name)  # an import error of an existing module fails
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    tests = [t for t in finder.find(module, name) if t.examples]
    if name in REQUIRED:
        assert tests, f"{name} has no docstring examples"
    report: list[str] = []
    failed = sum(runner.run(test, out=report.append).failed for test in tests)
    assert failed == 0, "".join(report)
