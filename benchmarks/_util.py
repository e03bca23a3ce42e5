"""Shared helpers for the benchmark scripts: timing medians and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def block(tree):
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def median_seconds(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 2,
                   inner: int = 1) -> float:
    """Median wall time of ``fn()`` (blocked), over ``repeats`` runs of ``inner`` calls each."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        block(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def environment() -> dict:
    """Where the figures were measured."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def emit(name: str, result: dict) -> None:
    """Prints ``result`` as JSON and writes it to ``benchmarks/results/<name>.json``."""
    result = {"benchmark": name, "environment": environment(), **result}
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    tmp = os.path.join(RESULTS, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, os.path.join(RESULTS, f"{name}.json"))
