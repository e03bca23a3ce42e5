"""Eager and first-call speed: what a notebook or command-line user waits for outside ``jit``.

Run: ``python benchmarks/eager.py [--repeats N] [--before-tree PATH] [--smoke] [--out-dir D]``
(about 3-6 minutes on a loaded 2-core machine at the default 5 repeats). ``--smoke`` runs every
measurement once on a tiny 8-16-4 MLP (four short-lived child processes: tens of seconds at
most) and writes its JSON to ``--out-dir`` or a temporary folder, never to
``benchmarks/results/``.

* ``cli_help``: wall time of ``python -m jaxopt_lab --help`` (a fresh interpreter each
  time), and whether ``import jaxopt_lab`` imports JAX, for this checkout and for the
  ``--before-tree`` checkout, interleaved.
* ``quantize_first_call``: in a fresh Python process per repeat, after ``import jaxopt_lab``
  and one trivial JAX op (backend start-up is not counted), the first, second and
  steady-state (median of 5) ``jol.quantize(params, bits=8)`` of a 64-256-150-10 MLP's
  params; for this checkout, for this checkout with every leaf on the per-leaf program
  (the previous code path, kept reachable), and for ``--before-tree``, interleaved.
* ``prune_update``: an eager ``tx.update`` (no ``jit`` around it) of
  ``optax.chain(optax.adam(1e-3), jol.prune(jol.magnitude_mask, schedule))`` on the same
  56,700-parameter MLP: the first call, then the median of later calls (the schedule
  changes every step, so every call recomputes the masks: the worst case), next to plain
  ``optax.adam`` timed alternately in the same process.

The JSON (benchmarks/_util.emit) records the commit of each checkout measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import add_common_args, block, emit, output_dir  # noqa: E402

import jaxopt_lab as jol  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = (64, 256, 150, 10)
SMOKE_SIZES = (8, 16, 4)  # --smoke: the same code path on 212 parameters


def mlp_params(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> dict:
    """Dense kernels and biases of an MLP (the default 64-256-150-10: 56,700 parameters)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)) * 0.05, "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _eager_update_seconds(tx, params, grads, calls: int) -> tuple[float, list[float]]:
    state = tx.init(params)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        updates, state = tx.update(grads, state, params)
        block((updates, state))
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def prune_update(repeats: int, sizes: tuple[int, ...] = SIZES) -> dict:
    params = mlp_params(sizes=sizes)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    n = sum(p.size for p in jax.tree.leaves(params))
    # A schedule that changes every step: every call recomputes the masks (the slow case).
    schedule = jol.polynomial_sparsity(0.0, 0.9, 0, 10 * repeats)
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
import time, sys
t_import = time.perf_counter()
import jax, jax.numpy as jnp
import jaxopt_lab as jol
if {per_leaf!r}:  # today's code with every leaf on the per-leaf program (the old path)
    from jaxopt_lab.quant import eager
    eager.MAX_LEAF_ELEMENTS = 0
sizes = {sizes!r}
keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
params = {{f"Dense_{{i}}": {{"kernel": jax.random.normal(k, (a, b)) * 0.05, "bias": jnp.zeros(b)}}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}}
jax.block_until_ready(params)
jax.block_until_ready(jnp.ones(3) + 1)  # backend start-up is not quantize's cost
t0 = time.perf_counter(); jax.block_until_ready(jol.quantize(params, bits=8))
t1 = time.perf_counter(); jax.block_until_ready(jol.quantize(params, bits=8))
t2 = time.perf_counter()
later = []
for _ in range(5):
    t = time.perf_counter(); jax.block_until_ready(jol.quantize(params, bits=8))
    later.append(time.perf_counter() - t)
later.sort()
print(t1 - t0, t2 - t1, later[2])
"""


def _trees(before_tree: str | None) -> dict[str, str]:
    """Checkouts to measure: this one, and ``--before-tree`` when given."""
    trees = {"after": ROOT}
    if before_tree:
        trees["before"] = os.path.abspath(before_tree)
    return trees


def _child_env(tree: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": tree}
    env.pop("XLA_FLAGS", None)  # the tests' 8 host devices are not what users run with
    return env


def quantize_first_call(processes: int, before_tree: str | None,
                        sizes: tuple[int, ...] = SIZES) -> dict:
    """First, second and steady-state `quantize` of the MLP's params, each repeat in fresh
    processes, the variants interleaved: ``after`` (this checkout), ``after_per_leaf``
    (this checkout with every leaf on the per-leaf program, i.e. the previous code path)
    and ``before`` (``--before-tree``)."""
    variants = {"after": (ROOT, False), "after_per_leaf": (ROOT, True)}
    if before_tree:
        variants["before"] = (os.path.abspath(before_tree), False)
    runs = {name: {"first": [], "second": [], "steady": []} for name in variants}
    for _ in range(processes):
        for name, (tree, per_leaf) in variants.items():
            child = _CHILD.format(per_leaf=per_leaf, sizes=sizes)
            done = subprocess.run([sys.executable, "-c", child], check=True, cwd=tempfile.gettempdir(),
                                  capture_output=True, text=True, env=_child_env(tree))
            first, second, steady = map(float, done.stdout.split()[-3:])
            runs[name]["first"].append(first)
            runs[name]["second"].append(second)
            runs[name]["steady"].append(steady)
    return {name: {"first_call_s_median": statistics.median(r["first"]),
                   "first_call_s": r["first"],
                   "second_call_ms_median": 1e3 * statistics.median(r["second"]),
                   "steady_call_ms_median": 1e3 * statistics.median(r["steady"]),
                   "processes": processes}
            for name, r in runs.items()}


def cli_help(repeats: int, before_tree: str | None) -> dict:
    """Wall time of ``python -m jaxopt_lab --help`` (interpreter start included), and
    whether ``import jaxopt_lab`` imports JAX, per checkout, interleaved."""
    trees = _trees(before_tree)
    times = {name: [] for name in trees}
    for _ in range(repeats):
        for name, tree in trees.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jaxopt_lab", "--help"], check=True,
                           cwd=tempfile.gettempdir(), capture_output=True, env=_child_env(tree))
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, tree in trees.items():
        probe = subprocess.run(
            [sys.executable, "-c", "import sys, jaxopt_lab; print('jax' in sys.modules)"],
            check=True, cwd=tempfile.gettempdir(), capture_output=True, text=True,
            env=_child_env(tree))
        out[name] = {"help_wall_s_median": statistics.median(times[name]),
                     "help_wall_s": times[name],
                     "import_loads_jax": probe.stdout.strip() == "True"}
    return out


def _commit_of(tree: str) -> str | None:
    done = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before-tree", metavar="PATH",
                        help="a checkout of the previous code (git worktree add PATH COMMIT): "
                             "--help and quantize are measured there too, interleaved")
    add_common_args(parser)
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    sizes = SMOKE_SIZES if args.smoke else SIZES
    result = {
        "note": "shared 2-core CPU (several agents at once): noisy; every before/after pair "
                "interleaved in one run, medians",
        "commits": {name: _commit_of(tree) for name, tree in _trees(args.before_tree).items()},
        "mlp_sizes": list(sizes),
        "cli_help": cli_help(1 if args.smoke else 3 * repeats, args.before_tree),
        "quantize_first_call": quantize_first_call(1 if args.smoke else max(3, repeats),
                                                   args.before_tree, sizes),
        "prune_update": prune_update(repeats, sizes),
    }
    emit("eager", result, out_dir=output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
