"""Every docstring example in the package runs and prints what it shows (doctest).

Modules are found by walking the package, so a module added later is tested without
editing this file; ``__main__`` (it runs the command line) is the one module not imported.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxopt_lab

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxopt_lab.__path__, prefix="jaxopt_lab.")
    # __main__ runs the command line; _jol_native is the compiled kernel library (ctypes,
    # not a Python module)
    if not m.name.endswith("__main__") and not m.name.endswith("_jol_native")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_modules_are_found():
    assert {"jaxopt_lab.quant.core", "jaxopt_lab.pruning.transform", "jaxopt_lab.app.cli"} <= set(
        MODULES)


@pytest.mark.parametrize("name", ["jaxopt_lab", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name)
             if t.examples]
    if not tests:
        pytest.skip(f"{name} has no docstring examples")
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
