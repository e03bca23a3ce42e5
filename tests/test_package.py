"""The package's namespace: every public name loads on first use, and nothing heavy loads
before (``import jaxopt_lab`` must not import JAX)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import jaxopt_lab as jol


def _fresh(code: str) -> str:
    """stdout of ``code`` run in a new interpreter (a fresh ``sys.modules``)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1]


def test_import_loads_no_jax():
    code = ("import sys, jaxopt_lab\n"
            "print(sorted(m for m in ('jax', 'jaxlib', 'numpy', 'flax', 'optax') "
            "if m in sys.modules))")
    assert _fresh(code) == "[]"


def test_every_public_name_resolves_and_is_listed():
    assert len(set(jol.__all__)) == len(jol.__all__)
    listed = set(dir(jol))
    for name in jol.__all__:
        module, attr = jol._LAZY[name]
        expected = importlib.import_module(module)
        if attr is not None:
            expected = getattr(expected, attr)
        assert getattr(jol, name) is expected, name
        assert name in listed, name


def test_star_import_binds_every_public_name():
    namespace: dict = {}
    exec("from jaxopt_lab import *", namespace)
    assert set(jol.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        jol.no_such_name  # noqa: B018
    assert not hasattr(jol, "no_such_name")


def test_no_public_name_is_also_a_module():
    """``jol.prune`` is the optax transformation and the package is ``jol.pruning``; no
    public name of the package is also one of its submodules (a module import would
    rebind it)."""
    code = ("import types, pkgutil, jaxopt_lab as jol\n"
            "mods = {m.name for m in pkgutil.iter_modules(jol.__path__)}\n"
            "import jaxopt_lab.pruning.masks\n"
            "print(sorted(n for n in jol.__all__ if n in mods and "
            "not isinstance(getattr(jol, n), types.ModuleType)), callable(jol.prune))")
    assert _fresh(code) == "[] True"


def test_moved_names_warn_and_resolve():
    with pytest.warns(DeprecationWarning, match="moved to jaxopt_lab.app.sweeps.sweep"):
        assert jol.sweep is importlib.import_module("jaxopt_lab.app.sweeps").sweep
    with pytest.warns(DeprecationWarning, match="moved to jaxopt_lab.app.models.TeacherCNN"):
        assert jol.train.TeacherCNN is jol.app.TeacherCNN


def test_submodules_import_as_usual():
    import jaxopt_lab.quant.core as core

    assert jol.quant.core is core and jol.quantize is core.quantize
