"""Executes every notebook in ``notebooks/`` with small settings; any cell error fails.

Each notebook runs top to bottom in a fresh kernel of *this* interpreter (a kernelspec written
to a temporary ``JUPYTER_PATH``, so a ``python3`` kernelspec pointing elsewhere is never
used), in its own temporary working directory, with ``JAXOPT_LAB_NOTEBOOK_QUICK=1`` (one epoch
everywhere). The kernels share a persistent JAX compilation cache, so the programs the
notebooks have in common (the teacher's train step...) compile once per test session.
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "jaxopt-lab-notebook-test"
CELL_TIMEOUT_S = 300  # a hang fails the test instead of stalling the suite


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> dict[str, str]:
    """Environment variables for hermetic kernels: kernelspec, runtime, IPython, JAX cache."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxopt_lab tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ipython = tmp_path_factory.mktemp("ipython")  # no user profile; plain-text tracebacks
    (ipython / "profile_default").mkdir()
    (ipython / "profile_default" / "ipython_kernel_config.py").write_text(
        'c.InteractiveShell.colors = "nocolor"\n'
    )
    return {
        "JUPYTER_PATH": str(jupyter),
        "JUPYTER_RUNTIME_DIR": str(tmp_path_factory.mktemp("jupyter_runtime")),
        "IPYTHONDIR": str(ipython),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAXOPT_LAB_NOTEBOOK_QUICK": "1",
    }


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "quantization", "pruning", "distillation", "bn_folding"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} was saved with outputs; clear them before committing"
    )
    first = code[0].source
    assert "google.colab" in first, f"{path.name}: the first code cell must be the Colab install"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_cell(path, monkeypatch):
    """On Colab the first cell pip-installs JAXOPT_LAB_SOURCE, and only when needed."""
    import importlib.util
    import subprocess
    import types

    source = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    exec(source.source, {})  # not on Colab: nothing happens
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(source.source, {})  # on Colab, jaxopt_lab already installed: nothing either
    assert calls == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jaxopt_lab" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="JAXOPT_LAB_SOURCE"):
        exec(source.source, {})  # on Colab without a source: a clear error
    exec(source.source.replace('JAXOPT_LAB_SOURCE = ""', 'JAXOPT_LAB_SOURCE = "pkg.whl"'), {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "pkg.whl"]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dirs, tmp_path, monkeypatch):
    for name, value in kernel_dirs.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "some cells did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    if path.stem == "quickstart":  # the report it shows was written where the kernel ran
        report = tmp_path / "jaxopt_lab_report"
        assert (report / "report.md").stat().st_size > 0
        assert (report / "pareto.png").stat().st_size > 0
