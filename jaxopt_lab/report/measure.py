"""Measuring one variant: accuracy, counts, the saved file's size, latency.

Every figure is taken from the tree read back from the file ``jol.save`` wrote, so a
variant is measured exactly as it would be deployed. Latency is the median of repeated
runs of the jitted inference path, after a compile-and-warm-up call; its ratio to the
baseline comes from runs alternating with the baseline's in the same process, so a
change of machine load during the job moves both.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jaxopt_lab as jol
from jaxopt_lab import train
from jaxopt_lab.report.training import run_once
from jaxopt_lab.report.variants import Variant

LATENCY_BATCHES = (1, 256)


@functools.cache
def _jitted(infer: Callable) -> Callable:
    # One jitted function per inference path, so variants sharing a path (same model,
    # same storage layout) share its compiled program.
    return jax.jit(infer)


def _timed(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def median_seconds(fn: Callable[[], Any], *, repeats: int, inner: int = 1,
                   against: Callable[[], Any] | None = None) -> tuple[float, float | None]:
    """Median wall time of ``fn()`` (blocked) over ``repeats`` runs of ``inner`` calls.

    With ``against``, its runs alternate with ``fn``'s and its median is returned too:
    a ratio of the two then compares them under the same machine load.
    """
    jax.block_until_ready(fn())  # compile and warm up
    if against is not None:
        jax.block_until_ready(against())
    times, other = [], []
    for _ in range(repeats):
        times.append(_timed(fn, inner))
        if against is not None:
            other.append(_timed(against, inner))
    return statistics.median(times), statistics.median(other) if other else None


def latency_inputs(x: np.ndarray) -> dict[int, np.ndarray]:
    """Test inputs at every latency batch size (rows repeated if the split is smaller)."""
    return {b: np.resize(x, (b, *x.shape[1:])) for b in LATENCY_BATCHES}


def latency_calls(variant: Variant, stored: Any, inputs: dict[int, np.ndarray]
                  ) -> dict[int, Callable[[], Any]]:
    """Zero-argument calls of the variant's jitted inference path, one per batch size."""
    fn = _jitted(variant.infer)
    prepared = jax.device_put(run_once(variant.prepare, stored))
    return {b: functools.partial(fn, prepared, jax.device_put(x)) for b, x in inputs.items()}


def latency(calls: dict[int, Callable[[], Any]], *, repeats: int,
            baseline: dict[int, Callable[[], Any]] | None = None) -> dict[str, float]:
    """``latency_b{B}_ms`` per batch size, and ``_ratio`` to ``baseline`` timed alternately."""
    out = {}
    for batch, call in calls.items():
        inner = 10 if batch == 1 else 1  # batch 1 is too quick to time one call at a time
        ms, base = median_seconds(call, repeats=repeats, inner=inner,
                                  against=None if baseline is None else baseline[batch])
        out[f"latency_b{batch}_ms"] = 1e3 * ms
        out[f"latency_b{batch}_ratio"] = 1.0 if base is None else ms / base
        if base is not None:
            out[f"latency_b{batch}_baseline_ms"] = 1e3 * base
    return out


def save_and_reload(variant: Variant, directory: str, metadata: dict) -> tuple[str, int, Any]:
    """Writes the variant with ``jol.save``; returns the path, its size and the reloaded tree."""
    path = os.path.join(directory, f"{variant.name}.safetensors")
    jol.save(path, variant.stored, metadata=metadata)
    return path, os.path.getsize(path), jol.load(path)


def counts(params: Any) -> dict[str, Any]:
    """Parameter count, nonzero count and the fraction of zeros in the kernels.

    Kernels are what ``jol.sparsity`` counts by default (float leaves with ndim >= 2);
    counted with numpy on the host, as the tree is already there.
    """
    leaves = [np.asarray(p) for p in jax.tree.leaves(params)]
    kernels = [p for p in leaves if p.ndim >= 2 and np.issubdtype(p.dtype, np.floating)]
    kernel_size = sum(p.size for p in kernels)
    kernel_zeros = sum(p.size - np.count_nonzero(p) for p in kernels)
    return {
        "params": sum(p.size for p in leaves),
        "nonzero_params": sum(int(np.count_nonzero(p)) for p in leaves),
        "sparsity": kernel_zeros / kernel_size if kernel_size else 0.0,
    }


def measure(variant: Variant, data: train.Dataset, directory: str, *, seed: int
            ) -> tuple[dict[str, Any], dict[int, Callable[[], Any]]]:
    """Saves, reloads and evaluates a variant: every figure of its row but latency.

    Returns the row and the variant's latency calls, compiled and warmed up, for
    :func:`latency`. Safe to run for several variants at once in threads; time the
    latency calls one variant at a time.
    """
    path, size, loaded = save_and_reload(variant, directory,
                                         {"variant": variant.name, "seed": seed})
    variables = run_once(variant.to_variables, loaded)
    scores = train.evaluate(variant.model, variables, data.test, num_classes=data.num_classes)
    calls = latency_calls(variant, loaded, latency_inputs(data.test.x))
    for call in calls.values():
        jax.block_until_ready(call())  # compile now, so timing later measures runs only
    row = {
        "name": variant.name,
        "description": variant.description,
        "accuracy": scores["accuracy"],
        "f1_macro": scores["f1_macro"],
        **counts(variables["params"]),
        "sparsity_target": variant.sparsity_target,
        "size_bytes": size,
        "file": os.path.basename(path),
        "seed": seed,
        **(variant.extra or {}),
    }
    return row, calls


def add_ratios(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Adds the accuracy, F1 and size changes against ``baseline`` to every row, in place."""
    for row in rows:
        row["accuracy_delta"] = row["accuracy"] - baseline["accuracy"]
        row["f1_macro_delta"] = row["f1_macro"] - baseline["f1_macro"]
        row["size_ratio"] = row["size_bytes"] / baseline["size_bytes"]


def all_finite(row: dict[str, Any]) -> bool:
    """True if every number in the row is finite."""
    return all(math.isfinite(v) for v in row.values()
               if isinstance(v, (int, float)) and not isinstance(v, bool))
