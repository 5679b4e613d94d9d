"""Runs the docstring examples of every hessjax module (each public function has one)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hessjax

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(hessjax.__path__, prefix="hessjax.")
    if info.name.rsplit(".", 1)[-1] not in ("cli",)
)
# Examples that build full-size networks (MobileNetV2, ResNet) run in the slow suite; their
# modules have fast unit tests of their own.
HEAVY = ("hessjax.models", "hessjax.train")
# Modules that must have docstring examples.
REQUIRED = (
    "hessjax.hessian",
    "hessjax.mapping",
    "hessjax.partition",
    "hessjax.bounds",
    "hessjax.measures.distance",
    "hessjax.measures.companions",
    "hessjax.losses",
    "hessjax.noise",
    "hessjax.transforms",
)


def test_required_modules_exist():
    assert set(REQUIRED) <= set(MODULES)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name.startswith(HEAVY) else name
        for name in MODULES
    ],
)
def test_docstring_examples(name):
    module = importlib.import_module(name)
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
