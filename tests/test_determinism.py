"""Determinism (issue 7): same seed and settings give bit-identical results.

Two runs of the main job's ``--quick`` path with ``--seed 0``: the session's in-process run
(the ``quick_report`` fixture of conftest.py) and one in a fresh subprocess (nothing cached or
shared, another ``PYTHONHASHSEED``). Every saved model must be the same file byte for byte,
and report.json the same except the timing figures (latencies, their ratios, wall times).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxopt_lab as jol

# Both modules share the session's one quick run: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group("quick_report")

TIMEOUT_S = 900


def _without_timings(report: dict) -> dict:
    """report.json minus what a clock measured."""
    report = {k: v for k, v in report.items() if k != "timings"}
    report["variants"] = [{k: v for k, v in row.items() if "latency" not in k}
                          for row in report["variants"]]
    return report


@pytest.fixture(scope="module")
def two_runs(quick_report, tmp_path_factory):
    code, first, _ = quick_report
    assert code == 0
    second = tmp_path_factory.mktemp("quick_report_again")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    env.pop("JAXOPT_LAB_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxopt_lab", "run", "--quick", "--out", str(second),
         "--seed", "0", "--no-progress"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return first, second


def test_saved_models_are_bit_identical(two_runs):
    first, second = two_runs
    names = sorted(os.listdir(first / "models"))
    assert names and names == sorted(os.listdir(second / "models"))
    for name in names:
        a, b = (first / "models" / name).read_bytes(), (second / "models" / name).read_bytes()
        assert a == b, f"models/{name} differs between two runs with the same seed"


def test_loaded_parameters_are_bit_identical(two_runs):
    # Byte-identical files imply this; checking the arrays too names the leaf on failure.
    first, second = two_runs
    for name in sorted(os.listdir(first / "models")):
        a, b = jol.load(first / "models" / name), jol.load(second / "models" / name)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, path)


def test_report_figures_other_than_timings_are_identical(two_runs):
    reports = [json.loads((d / "report.json").read_text()) for d in two_runs]
    a, b = (_without_timings(r) for r in reports)
    assert [row["name"] for row in a["variants"]] == [row["name"] for row in b["variants"]]
    for row_a, row_b in zip(a["variants"], b["variants"]):
        assert row_a == row_b, row_a["name"]
    assert a == b
    assert any("latency" in k for k in reports[0]["variants"][0])  # timings were dropped
