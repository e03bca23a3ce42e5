"""Vmapped sweep vs the same configurations trained one after another, in one process.

Eight configurations of the reference student on digits (8 final sparsities of gradual
magnitude pruning, or 8 learning rates with ``--param learning_rate``), each a whole
training run under ``lax.scan``:

* ``vmapped``: ``jit(vmap(run))`` over the 8 values -- one program, one call;
* ``sequential``: ``jit(run)`` called once per value (compiled once, run 8 times);
* ``single``: one call of ``jit(run)`` (one configuration).

Target (issue 6): ``vmapped <= 3 x single``. Run times exclude compilation, which is
reported separately. Prints JSON and writes ``benchmarks/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import emit, median_seconds  # noqa: E402

from jaxopt_lab import sweep as _  # noqa: E402,F401  (the package, for jol.sweep below)
from jaxopt_lab.sweep import DEFAULT_VALUES, student_sweep_setup, training_run  # noqa: E402


def _timed_compile(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--param", choices=sorted(DEFAULT_VALUES), default="sparsity")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    values = jnp.asarray(DEFAULT_VALUES[args.param], jnp.float32)
    model, data, make = student_sweep_setup(args.param, epochs=args.epochs)
    run = training_run(model, data, make, epochs=args.epochs, batch_size=64, seed=0)

    vmapped, vmapped_compile_s = _timed_compile(jax.jit(jax.vmap(run)), values)
    single, single_compile_s = _timed_compile(jax.jit(run), values[0])

    def sequential():
        return [single(v) for v in values]

    t_vmapped = median_seconds(lambda: vmapped(values), repeats=args.repeats, warmup=1)
    t_single = median_seconds(lambda: single(values[0]), repeats=args.repeats, warmup=1)
    t_sequential = median_seconds(sequential, repeats=args.repeats, warmup=1)

    out_v = jax.device_get(vmapped(values))
    out_s = [jax.device_get(o) for o in sequential()]
    acc_v = [float(a) for a in out_v["accuracy"]]
    acc_s = [float(o["accuracy"]) for o in out_s]
    emit("sweep", {
        "param": args.param,
        "configurations": len(values),
        "values": [float(v) for v in values],
        "epochs": args.epochs,
        "steps_per_run": int(args.epochs * (len(data.train.y) // 64)),
        "repeats": args.repeats,
        "vmapped_s": t_vmapped,
        "single_configuration_s": t_single,
        "sequential_s": t_sequential,
        "vmapped_over_single": t_vmapped / t_single,
        "sequential_over_vmapped": t_sequential / t_vmapped,
        "target_vmapped_over_single_max": 3.0,
        "meets_target": bool(t_vmapped <= 3.0 * t_single),
        "compile_s": {"vmapped": vmapped_compile_s, "single": single_compile_s},
        "accuracy_vmapped": acc_v,
        "accuracy_sequential": acc_s,
        "max_abs_accuracy_difference": float(np.max(np.abs(np.subtract(acc_v, acc_s)))),
    })


if __name__ == "__main__":
    main()
