"""Inference time of the digits TeacherCNN, folded (BatchNorms skipped) vs unfolded.

Both run in this one process, jitted and warmed up, at batch 1 and 256. Single calls are
timed (to completion), interleaved across variants with the order reversed every other
repeat, so drift and other processes' load hit all variants alike; the medians over
thousands (batch 1) or hundreds (batch 256) of repeats are reported, with their ratio. Process
CPU time is reported too: it is far less sensitive than wall time to other processes
competing for the cores (the load average is recorded alongside). Also reported: the
folded variables run through the plain ``model.apply`` (BatchNorms computed, as identities),
and the max relative output difference (a correctness check, not a timing).

Each speedup is the median of per-round ratios (unfolded / folded), with its quartiles and
extremes (``_util.paired_ratio``); the ratio of the medians is given alongside.

Run: ``python benchmarks/bn_fold.py [--repeats N] [--smoke]``. Prints JSON and writes
``benchmarks/results/bn_fold.json`` (``--smoke``: batch 1 only, 5 repeats, JSON to a temporary
folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxopt_lab as jol
from jaxopt_lab.app.models import TeacherCNN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import add_common_args, emit, output_dir, paired_ratio  # noqa: E402


def _variables(model, x, seed=0):
    """Initialised weights with random, valid running statistics (values do not affect time)."""
    v = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])
    rng = np.random.default_rng(seed)
    stats = {name: {"mean": jnp.asarray(rng.normal(0.0, 0.5, s["mean"].shape), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.2, 3.0, s["var"].shape), jnp.float32)}
             for name, s in v["batch_stats"].items()}
    return {**v, "batch_stats": stats}


def _per_call_seconds(fn, variables, x, calls: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per call, averaged over ``calls`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        out = fn(variables, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def measure(batch: int, repeats: int, *, warmup_calls: int | None = None) -> dict:
    model = TeacherCNN()
    x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 8, 8, 1)), jnp.float32)
    v = _variables(model, x)
    folded, report = jol.bn_fold(model, v, x, train=False, return_report=True)
    runs = {
        "unfolded": (jax.jit(lambda v, x: model.apply(v, x, train=False)), v),
        "folded_bn_skipped": (jax.jit(lambda v, x: jol.folded_apply(
            model, v, x, report=report, train=False)), folded),
        "folded_plain_apply": (jax.jit(lambda v, x: model.apply(v, x, train=False)), folded),
    }
    want = np.asarray(runs["unfolded"][0](v, x))
    max_rel_err = max(
        float(np.abs(np.asarray(fn(vars_, x)) - want).max() / np.abs(want).max())
        for fn, vars_ in runs.values())
    calls = 1  # time single calls: a preemption then spoils one sample, which the median drops
    for fn, vars_ in runs.values():  # warm-up beyond compilation (allocations, caches)
        _per_call_seconds(fn, vars_, x, warmup_calls or (200 if batch == 1 else 20))
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, vars_ = runs[name]
            w, c = _per_call_seconds(fn, vars_, x, calls)
            wall[name].append(w)
            cpu[name].append(c)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    ms = lambda d: {k: round(t * 1e3, 5) for k, t in d.items()}  # noqa: E731
    return {
        "batch": batch,
        "calls_per_repeat": calls,
        "repeats": repeats,
        "median_wall_ms": ms(med),
        "min_wall_ms": ms({k: min(ts) for k, ts in wall.items()}),
        "median_process_cpu_ms": ms(med_cpu),
        # unfolded / folded: > 1 means folding is faster.
        "speedup_folded_vs_unfolded": paired_ratio(wall["unfolded"],
                                                   wall["folded_bn_skipped"]),
        "speedup_process_cpu": paired_ratio(cpu["unfolded"], cpu["folded_bn_skipped"]),
        "folded_not_slower": med["folded_bn_skipped"] <= med["unfolded"],
        "folded_not_slower_cpu": med_cpu["folded_bn_skipped"] <= med_cpu["unfolded"],
        "pairs_folded": len(report.folded),
        "max_rel_output_diff": max_rel_err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per batch size (default: 3001 at batch 1, 301 at 256)")
    args = add_common_args(parser).parse_args()
    if args.smoke:  # batch 1 alone: batch 256 runs the same lines, with its own compiles
        repeats = {1: args.repeats or 5}
    else:
        repeats = {1: args.repeats or 3001, 256: args.repeats or 301}
    result = {
        "model": "TeacherCNN (digits, 8x8x1 inputs)",
        "device": str(jax.devices()[0]),
        "results": [measure(b, repeats[b], warmup_calls=2 if args.smoke else None)
                    for b in repeats],
    }
    emit("bn_fold", result, out_dir=output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
