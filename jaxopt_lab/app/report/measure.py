"""Measuring one variant: accuracy, counts, the saved file's size, latency.

Every figure is taken from the tree read back from the file ``jol.save`` wrote, so a
variant is measured exactly as it would be deployed. Latency is the median of single,
blocked calls of the jitted inference path, after a compile-and-warm-up call, alternating
with the baseline's calls (and alternating which goes first), so a change of machine load
during the job moves both; ratios are quotients of the figures the report prints.
Accuracy comes with its Wilson 95% interval for the test-set size.
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
from jaxopt_lab.app.report.training import run_once
from jaxopt_lab.app.report.variants import Variant

LATENCY_BATCHES = (1, 256)


@functools.cache
def _jitted(infer: Callable) -> Callable:
    # One jitted function per inference path, so variants sharing a path (same model,
    # same storage layout) share its compiled program.
    return jax.jit(infer)


def _timed_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())  # per call: never several calls in flight at once
    return time.perf_counter() - t0


def paired_seconds(fn: Callable[[], Any], *, repeats: int,
                   against: Callable[[], Any] | None = None) -> tuple[list[float], list[float]]:
    """Wall times of ``repeats`` single blocked calls of ``fn`` (and of ``against``).

    After one compile-and-warm-up call of each, ``fn`` and ``against`` alternate, and which
    one goes first alternates too (ABBA...), so neither gets the warmer cache or the
    quieter moment systematically.
    """
    jax.block_until_ready(fn())  # compile and warm up
    if against is not None:
        jax.block_until_ready(against())
    times, other = [], []
    for i in range(repeats):
        if against is not None and i % 2:
            other.append(_timed_once(against))
            times.append(_timed_once(fn))
        else:
            times.append(_timed_once(fn))
            if against is not None:
                other.append(_timed_once(against))
    return times, other


def median_seconds(fn: Callable[[], Any], *, repeats: int,
                   against: Callable[[], Any] | None = None) -> tuple[float, float | None]:
    """Medians of :func:`paired_seconds` (``None`` for ``against`` when not given)."""
    times, other = paired_seconds(fn, repeats=repeats, against=against)
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


# XLA's CPU backend hands fused subgraphs to YNNPACK, whose buffers `memory_analysis()`
# cannot see: the float TeacherCNN at batch 256 reports 640 B of temporaries, 6.3 MB with
# that fusion off, and at batch 4096 its process grows by 81 MB with the fusion, 98 MB
# without (ru_maxrss). A program whose layers are custom calls (the native int8 kernels) shows every
# activation. So memory is read from the same program compiled with the fusion off, where
# every intermediate is an XLA buffer, and the comparison between variants is like for like.
_ALL_BUFFERS_VISIBLE = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _temp_bytes(lowered: Any) -> tuple[int, bool]:
    """XLA's temporary bytes of one call, and whether the YNN fusion was off for it."""
    options = _ALL_BUFFERS_VISIBLE if jax.default_backend() == "cpu" else {}
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:  # a JAX whose XLA no longer has the option
        if "No such compile option" not in str(e):
            raise
        compiled, options = lowered.compile(), {}
    analysis = compiled.memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis else 0
    return temp, bool(options)


def memory(variant: Variant, stored: Any, inputs: dict[int, np.ndarray]) -> dict[str, Any]:
    """Inference memory: resident weight bytes plus XLA's temporary bytes per batch size.

    The weights are the prepared tree held on the device between calls; the temporaries
    come from the compiled program's ``memory_analysis()`` (what XLA allocates per call
    besides arguments and outputs), on CPU for the program compiled without YNNPACK fusion,
    whose internal buffers the analysis would miss (``memory_all_buffers_visible`` says
    whether that held). ``memory_b{B}_bytes`` is their sum.
    """
    prepared = run_once(variant.prepare, stored)
    weights = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(prepared)))
    out: dict[str, Any] = {"memory_weights_bytes": weights}
    visible = True
    for b, x in inputs.items():
        temp, off = _temp_bytes(_jitted(variant.infer).lower(prepared, x))
        visible &= off or jax.default_backend() != "cpu"
        out[f"memory_temp_b{b}_bytes"] = temp
        out[f"memory_b{b}_bytes"] = weights + temp
    out["memory_all_buffers_visible"] = visible
    return out


def latency(calls: dict[int, Callable[[], Any]], *, repeats: int,
            baseline: dict[int, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Per-call latency medians ``latency_b{B}_ms``, each call blocked on its own.

    With ``baseline``, its calls alternate with these (:func:`paired_seconds`) and its raw
    times come back as ``latency_b{B}_baseline_samples_ms``: the job pools every such
    sample into the baseline's own figure, and each ratio in the report is a quotient of
    two figures the table prints (:func:`add_latency_ratios`).
    """
    out: dict[str, Any] = {}
    for batch, call in calls.items():
        times, base = paired_seconds(call, repeats=repeats,
                                     against=None if baseline is None else baseline[batch])
        out[f"latency_b{batch}_ms"] = 1e3 * statistics.median(times)
        out[f"latency_b{batch}_samples_ms"] = [1e3 * t for t in times]
        if base:
            out[f"latency_b{batch}_baseline_samples_ms"] = [1e3 * t for t in base]
            out[f"latency_b{batch}_paired_ratio"] = statistics.median(times) / statistics.median(base)
    return out


def add_latency_ratios(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Sets the baseline's latency to the median of all its samples (its own and those taken
    alternately with each variant), then ``latency_b{B}_ratio = ms / baseline ms`` for
    every row, in place: the ratio is computed from the printed figures."""
    for b in LATENCY_BATCHES:
        key = f"latency_b{b}_ms"
        if key not in baseline:
            continue
        pooled = list(baseline.get(f"latency_b{b}_samples_ms", []))
        for row in rows:
            pooled += row.pop(f"latency_b{b}_baseline_samples_ms", [])
        if pooled:
            baseline[key] = statistics.median(pooled)
        for row in rows:
            if key in row:
                row[f"latency_b{b}_ratio"] = row[key] / baseline[key]


def wilson_interval(accuracy: float, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy measured on ``n`` examples.

    Examples:
      >>> lo, hi = wilson_interval(0.98, 359)
      >>> round(lo, 4), round(hi, 4)
      (0.9596, 0.9902)
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(accuracy, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 an end equals p exactly in real arithmetic; rounding can put it a
    # hair inside (1 - 1e-16), and a plot's error bar would then be negative.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


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
    seen = {split: train.evaluate(variant.model, variables, getattr(data, split),
                                  num_classes=data.num_classes)["accuracy"]
            for split in ("train", "val")}
    low, high = wilson_interval(scores["accuracy"], len(data.test.y))
    inputs = latency_inputs(data.test.x)
    calls = latency_calls(variant, loaded, inputs)
    for call in calls.values():
        jax.block_until_ready(call())  # compile now, so timing later measures runs only
    row = {
        "name": variant.name,
        "description": variant.description,
        "accuracy": scores["accuracy"],
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "test_examples": len(data.test.y),
        "train_accuracy": seen["train"],
        "val_accuracy": seen["val"],
        "f1_macro": scores["f1_macro"],
        **counts(variables["params"]),
        "sparsity_target": variant.sparsity_target,
        "size_bytes": size,
        **memory(variant, loaded, inputs),
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
