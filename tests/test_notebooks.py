"""The notebooks: committed executed, Colab-ready, and re-executed here with quick settings.

Each notebook runs top to bottom in a fresh kernel of *this* interpreter
(``notebooks/refresh.py``: a kernelspec written to a temporary ``JUPYTER_PATH``), in its
own temporary working directory, with ``QUICK = True`` appended to its cell tagged
``parameters``. The kernels share a persistent JAX compilation cache, so the programs the
notebooks have in common (the teacher's train step...) compile once per test session, and
compile at LLVM -O0 (all but ``OPTIMISED_CODEGEN``): a quick run is mostly compilation.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import tomllib

import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Kernels that keep the default codegen: one_shot's quick run is GPTQ/SparseGPT arithmetic
# more than compilation, and took 30% more CPU time at -O0 (measured).
OPTIMISED_CODEGEN = {"one_shot"}
CELL_TIMEOUT_S = 300  # a hang fails the test instead of stalling the suite
# The repository's address, declared once in pyproject.toml ([project.urls] Repository).
REPOSITORY = tomllib.loads((NOTEBOOK_DIR.parent / "pyproject.toml").read_text())[
    "project"]["urls"]["Repository"]


def _refresh():
    spec = importlib.util.spec_from_file_location("notebook_refresh", NOTEBOOK_DIR / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> dict[str, str]:
    """Environment variables for hermetic kernels: kernelspec, runtime, IPython, JAX cache."""
    env = _refresh().kernel_env(tmp_path_factory.mktemp("kernel"))
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "quantization", "pruning", "distillation", "bn_folding"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: not saved from one top-to-bottom run (python notebooks/refresh.py)")
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], path.name
    assert len(outputs) >= 3, f"{path.name} shows almost no results"
    if path.stem == "quickstart":  # the report table and the plot are shown
        kinds = {k for o in outputs for k in o.get("data", {})}
        assert {"text/markdown", "image/png"} <= kinds, kinds


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_parameters_cell_and_no_test_switch_in_prose(path):
    nb = nbformat.read(path, as_version=4)
    assert "colab-badge.svg" in nb.cells[0].source
    org_repo = REPOSITORY.removeprefix("https://github.com/").rstrip("/")
    assert (f"(https://colab.research.google.com/github/{org_repo}/blob/main/notebooks/"
            f"{path.name})") in nb.cells[0].source, "badge does not match pyproject's URL"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert "QUICK = False" in tagged[0].source
    assert not any("JAXOPT_LAB_NOTEBOOK_QUICK" in c.source for c in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_works_unedited_from_a_checkout(path, monkeypatch):
    """The first code cell pip-installs the checkout (``..``) only when jaxopt_lab is
    missing; Colab needs one line changed, the one naming JAXOPT_LAB_SOURCE."""
    import subprocess

    source = next(c for c in nbformat.read(path, as_version=4).cells
                  if c.cell_type == "code").source
    assert [line for line in source.splitlines()
            if line.startswith("JAXOPT_LAB_SOURCE =")] == [
        f'JAXOPT_LAB_SOURCE = ".."  # Colab: "git+{REPOSITORY}" (the only line to change)']
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    exec(source, {})  # installed already: nothing happens
    assert calls == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jaxopt_lab" else real_find_spec(name, *a))
    exec(source, {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", ".."]]
    assert (NOTEBOOK_DIR.parent / "pyproject.toml").exists()  # what ".." installs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dirs, tmp_path, monkeypatch):
    for name, value in kernel_dirs.items():
        monkeypatch.setenv(name, value)
    if path.stem not in OPTIMISED_CODEGEN:
        # LLVM -O0 codegen in the kernel: a quick run is mostly XLA compilation (-25% CPU
        # time measured), and what is checked here (every cell runs, the round trips are
        # exact) does not depend on it.
        monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "")
                                         + " --xla_backend_optimization_level=0").strip())
    # Raises CellExecutionError, with the cell and its traceback, on any error.
    nb = _refresh().execute(path, quick=True, workdir=tmp_path, timeout=CELL_TIMEOUT_S)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "some cells did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    if path.stem == "quickstart":  # the report it shows was written where the kernel ran
        report = tmp_path / "jaxopt_lab_report"
        assert (report / "report.md").stat().st_size > 0
        assert (report / "pareto.png").stat().st_size > 0
