"""Eager and first-call speed: what a notebook user waits for outside ``jit``.

Run: ``python benchmarks/eager.py [--label NAME] [--repeats N]``.

* ``prune_update``: an eager ``tx.update`` (no ``jit`` around it) of
  ``optax.chain(optax.adam(1e-3), jol.prune(jol.magnitude_mask, schedule))`` on a
  56,700-parameter MLP (64-256-150-10 Dense kernels and biases): the first call, then the
  median of later calls (the schedule changes every step, so every call recomputes the
  masks: the worst case), next to plain ``optax.adam`` timed alternately in the same process.
* ``quantize_first_call``: in a fresh Python process per repeat, after ``import jaxopt_lab``
  and one trivial JAX op (so backend start-up is not counted), the wall time of the first
  ``jol.quantize(params, bits=8)`` of the same MLP's params, then of a second call; and the
  same for ``whole_tree_jit``, the proposed change (finiteness checked on the host, every
  leaf quantized in one compiled program).

Results go under ``runs[label]`` of ``benchmarks/results/eager.json``, keeping other labels,
so figures before and after a change sit side by side (measured one after the other, not
interleaved: the changes measured here are far larger than the machine's noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import RESULTS, block, emit  # noqa: E402

import jaxopt_lab as jol  # noqa: E402

SIZES = (64, 256, 150, 10)


def mlp_params(seed: int = 0) -> dict:
    """Dense kernels and biases of a 64-256-150-10 MLP: 56,700 parameters."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES) - 1)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)) * 0.05, "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))}


def _eager_update_seconds(tx, params, grads, calls: int) -> tuple[float, list[float]]:
    state = tx.init(params)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        updates, state = tx.update(grads, state, params)
        block((updates, state))
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def prune_update(repeats: int) -> dict:
    params = mlp_params()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    n = sum(p.size for p in jax.tree.leaves(params))
    # A schedule that changes every step: every call recomputes the masks (the slow case).
    schedule = jol.polynomial_schedule(0.0, 0.9, 0, 10 * repeats)
    pruned = optax.chain(optax.adam(1e-3), jol.prune(jol.magnitude_mask, schedule))
    plain = optax.adam(1e-3)
    first_pruned, _ = _eager_update_seconds(pruned, params, grads, 1)
    first_plain, _ = _eager_update_seconds(plain, params, grads, 1)
    later_pruned, later_plain = [], []
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        later_pruned += _eager_update_seconds(pruned, params, grads, 3)[1]
        later_plain += _eager_update_seconds(plain, params, grads, 3)[1]
    return {
        "params": int(n),
        "first_call_s": first_pruned,
        "later_call_median_ms": 1e3 * statistics.median(later_pruned),
        "plain_adam_first_call_s": first_plain,
        "plain_adam_later_call_median_ms": 1e3 * statistics.median(later_plain),
        "later_calls_timed": len(later_pruned),
    }


_CHILD = """
import functools, time, sys
sys.path.insert(0, {bench!r})
import jax, jax.numpy as jnp, numpy as np
import jaxopt_lab as jol
from eager import mlp_params
params = jax.block_until_ready(mlp_params())
jax.block_until_ready(jnp.ones(3) + 1)  # backend start-up is not quantize's cost
if {whole_tree!r}:
    # The proposal for quant/core.py: the finiteness check on the host and every leaf in
    # one program compiled once (today: one program per leaf shape plus two per check).
    jitted = jax.jit(functools.partial(jol.quantize, bits=8))
    def quantize(tree):
        for x in jax.tree.leaves(tree):
            assert np.isfinite(np.asarray(x)).all()
        return jitted(tree)
else:
    quantize = functools.partial(jol.quantize, bits=8)
t0 = time.perf_counter(); jax.block_until_ready(quantize(params))
t1 = time.perf_counter(); jax.block_until_ready(quantize(params))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def quantize_first_call(repeats: int) -> dict:
    bench = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for name, whole_tree in (("jol.quantize", False), ("whole_tree_jit", True)):
        firsts, seconds = [], []
        for _ in range(repeats):
            child = _CHILD.format(bench=bench, whole_tree=whole_tree)
            done = subprocess.run([sys.executable, "-c", child], check=True,
                                  capture_output=True, text=True, env=os.environ)
            first, second = map(float, done.stdout.split()[-2:])
            firsts.append(first)
            seconds.append(second)
        out[name] = {"first_call_s_median": statistics.median(firsts), "first_call_s": firsts,
                     "second_call_ms_median": 1e3 * statistics.median(seconds),
                     "processes": repeats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="key of this run in the JSON")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run = {"prune_update": prune_update(args.repeats),
           "quantize_first_call": quantize_first_call(max(3, args.repeats // 2))}
    path = os.path.join(RESULTS, "eager.json")
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f).get("runs", {})
    runs[args.label] = run
    emit("eager", {
        "note": "shared 2-core CPU (6 agents at once): noisy; before/after measured one "
                "after the other, plain adam interleaved with prune in each run",
        "runs": runs,
    })


if __name__ == "__main__":
    main()
