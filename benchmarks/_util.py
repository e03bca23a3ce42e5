"""Shared helpers for the benchmark scripts: provenance, interleaved timing, ratios, JSON output.

Every results JSON written through :func:`emit` carries a ``provenance`` record (commit, UTC
date, machine, load averages, library versions, the exact command), so a figure can be traced
to the code that produced it; ``tests/test_benchmark_readme.py`` fails when a README figure's
JSON is older than the code it measures.

``--smoke`` (see :func:`add_common_args`): tiny sizes and few repeats, and the JSON goes to a
temporary folder, never into ``benchmarks/results/``; ``tests/test_benchmarks.py`` runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Taken when a benchmark script imports this module, i.e. at its start: the load the run
# began under, before its own work adds to it.
_LOAD_AT_START = os.getloadavg()
_START_WALL = time.time()


def block(tree):
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def median_seconds(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 2,
                   inner: int = 1) -> float:
    """Median wall time of ``fn()`` (blocked), over ``repeats`` runs of ``inner`` calls each.

    One function alone: for a comparison use :func:`interleaved_seconds`, so that a slow
    phase of a shared machine hits every variant alike.
    """
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


def interleaved_seconds(fns: dict[str, Callable[[], object]], *, repeats: int,
                        warmup: int = 2) -> dict[str, list[float]]:
    """Per-round wall times of each ``fns`` entry (one blocked call each), interleaved.

    In each round every function runs once; the order is reversed every other round, so
    neither drift nor "runs right after the other one" favours a variant. Returns the
    per-round seconds of each name, in round order (round ``i`` of every name is paired).
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            block(fns[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """``num / den`` from paired rounds: the median of per-round ratios, with its spread.

    The default statistic for every ratio in the results: a round's two times were taken
    back to back, so their ratio is robust to load drifting on a shared machine. The ratio
    of the medians is given alongside (it is not the headline figure), and so are the
    quartiles and extremes of the per-round ratios.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs equal, non-empty rounds, got {len(num)} and "
                         f"{len(den)}")
    ratios = sorted(n / d for n, d in zip(num, den, strict=True))
    return {
        "statistic": "median of per-round ratios",
        "value": statistics.median(ratios),
        "spread": {"q25": _quantile(ratios, 0.25), "q75": _quantile(ratios, 0.75),
                   "min": ratios[0], "max": ratios[-1]},
        "rounds": len(ratios),
        "ratio_of_medians": statistics.median(num) / statistics.median(den),
    }


def _git(*args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if strip else out.stdout


def dirty_paths() -> list[str]:
    """Files (tracked or untracked) that differ from ``HEAD``, outside ``benchmarks/results/``.

    ``benchmarks/results/`` is left out: it is what the benchmarks write, and a ``run_all``
    would otherwise mark every benchmark after the first one dirty.
    """
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".",
                  ":(exclude)benchmarks/results", strip=False)
    # Porcelain lines are "XY path" (or "XY old -> new"): the path starts at column 3.
    return sorted(line[3:].split(" -> ")[-1] for line in (status or "").splitlines())


def commit() -> str:
    """``git rev-parse HEAD``, plus ``-dirty`` when :func:`dirty_paths` is not empty."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    return head + ("-dirty" if dirty_paths() else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is recorded as None
        return None


def provenance() -> dict:
    """Where, when, with what and by which command the figures were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "commit": commit(),
        # The test of README figures accepts a dirty tree only outside the measured code.
        "dirty_paths": dirty_paths(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": usable,
            "arch": platform.machine(),
            "platform": platform.platform(),
            "load_average_start": [round(a, 2) for a in _LOAD_AT_START],
            "load_average_end": [round(a, 2) for a in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "flax": _version("flax"),
            "optax": _version("optax"),
            "numpy": _version("numpy"),
        },
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "run_seconds": round(time.time() - _START_WALL, 1),
    }


def environment() -> dict:
    """Kept for older callers: the device part of :func:`provenance`."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--smoke`` and ``--out-dir``, the same on every benchmark script."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and few repeats, to check the script runs; writes "
                             "its JSON to a temporary folder (or --out-dir), never to "
                             "benchmarks/results/")
    parser.add_argument("--out-dir", default=None,
                        help="folder for the JSON (default: benchmarks/results/, or a new "
                             "temporary folder with --smoke)")
    return parser


def output_dir(args: argparse.Namespace) -> str:
    """Where this run's JSON goes: ``--out-dir``, a temporary folder for ``--smoke``, or
    ``benchmarks/results/``."""
    if args.out_dir:
        return args.out_dir
    if args.smoke:
        return tempfile.mkdtemp(prefix="jaxopt_lab_bench_smoke_")
    return RESULTS


def emit(name: str, result: dict, *, out_dir: str = RESULTS, smoke: bool = False) -> str:
    """Prints ``result`` as JSON and writes it, with its provenance, to ``out_dir/<name>.json``.

    Returns the path written. A smoke run refuses to write into ``benchmarks/results/``:
    its tiny-size figures must never replace real ones.
    """
    if smoke and os.path.realpath(out_dir) == os.path.realpath(RESULTS):
        raise ValueError(f"a --smoke run must not write into {RESULTS}")
    result = {"benchmark": name, "smoke": smoke, "provenance": provenance(), **result}
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    path = os.path.join(out_dir, f"{name}.json")
    os.replace(tmp, path)
    return path
