"""Pruning benchmark: accuracy of gradual pruning on the digits teacher, and the cost of
``jol.prune`` inside an optimizer step.

Run: ``python benchmarks/pruning.py [--quick] [--reps N] [--overhead-only] [--smoke]``.
Prints JSON and writes ``benchmarks/results/pruning.json``; ``--overhead-only`` (alias
``--skip-accuracy``) re-measures just the overhead section and keeps the accuracy section
already in that file together with the provenance of the run that measured it
(``accuracy.provenance``; ``sections_measured`` says which sections this run measured).
``--quick`` (fewer epochs and steps) and ``--smoke`` (2 layers of 64x64, 3 steps, 1 epoch,
only the 2:4 fine-tuning run) write to a temporary folder, never over the real figures.

Every ratio is the median of per-round ratios of one interleaved pair, with its spread
(``_util.paired_ratio``); the ratio of the medians and of the minima are given alongside.

Accuracy: the dense TeacherCNN is trained, then fine-tuned with
``optax.chain(adam, jol.prune(mask_fn, polynomial_sparsity(...)))`` to 50% and 90%
unstructured (magnitude) sparsity and to 2:4; the last state is evaluated on the test split
(its sparsity is checked to be exact). Overhead: 4 layers of 1024x1024 (plus biases) with
adam, jitted steps with donated buffers, timed interleaved in pairs in one process: the
plain optax step against an ordinary step with ``prune`` (masks unchanged); the same pair
in whole training steps (forward and backward on a batch of 128, then adam); and the
ordinary step against one where the schedule changes so the masks are recomputed. A
sort-based mask recompute (what the widely used JAX pruning library does) is timed the
same way for reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab import _select
from jaxopt_lab.app import TeacherCNN, load_digits
from jaxopt_lab.train import evaluate, fit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import add_common_args, emit, output_dir, paired_ratio, provenance  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pruning.json")
TRAIN_BATCH = 128  # batch of the whole-training-step overhead pair


# --- overhead -------------------------------------------------------------------------


def _layers(n_layers: int, dim: int, seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), n_layers)
    return {
        f"layer{i}": {"kernel": jax.random.normal(k, (dim, dim)) * 0.02, "bias": jnp.zeros(dim)}
        for i, k in enumerate(keys)
    }


def sort_magnitude_mask(tree, sparsity):
    """Reference: threshold from a full sort of |w| (ties not made exact)."""

    def one(x):
        if x.ndim < 2:
            return jnp.ones(x.shape, bool)
        flat = jnp.sort(jnp.abs(x).ravel())
        k = jnp.floor(sparsity * x.size).astype(jnp.int32)
        threshold = flat[jnp.clip(k - 1, 0, x.size - 1)]
        return (jnp.abs(x) > threshold) | (k == 0)

    return jax.tree.map(one, tree)


def _mlp_loss(params, x, y):
    """Squared error of the ``_layers`` MLP (ReLU between layers) on one batch."""
    h = x
    for i in range(len(params)):
        if i:
            h = jax.nn.relu(h)
        h = h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
    return jnp.mean((h - y) ** 2)


def _timed_runs(txs: dict, reps: int, n_layers: int, dim: int, batch: int | None = None) -> dict:
    """Median wall-clock ms of one jitted step per transformation, timed interleaved.

    Without ``batch`` a step is the optimizer alone on fixed gradients; with it, a whole
    training step: forward and backward of the MLP on one ``batch x dim`` batch, then the
    optimizer.
    """
    if batch is None:
        grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), _layers(n_layers, dim, 1))
        keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(grads))))
        data = jax.tree.map(lambda g: g * jax.random.normal(next(keys), g.shape), grads)
    else:
        kx, ky = jax.random.split(jax.random.PRNGKey(3))
        data = (jax.random.normal(kx, (batch, dim)), jax.random.normal(ky, (batch, dim)))
    runs = {}
    for name, tx in txs.items():

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(p, s, data, tx=tx):
            g = data if batch is None else jax.grad(_mlp_loss)(p, *data)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = _layers(n_layers, dim, 0)
        s = tx.init(p)
        for _ in range(3):  # compile, and get past the first (mask-computing) step
            p, s = step(p, s, data)
        jax.block_until_ready(p)
        runs[name] = {"step": step, "p": p, "s": s, "times": []}
    for _ in range(reps):
        for r in runs.values():
            t = time.perf_counter()
            r["p"], r["s"] = r["step"](r["p"], r["s"], data)
            jax.block_until_ready((r["p"], r["s"]))
            r["times"].append(time.perf_counter() - t)
    return {
        k: (float(np.median(r["times"])) * 1e3, r["p"], float(np.min(r["times"])) * 1e3,
            np.asarray(r["times"]))
        for k, r in runs.items()
    }


def _pair(runs: dict, num: str, den: str) -> dict:
    """Ratios of two step kinds timed in one interleaved pair."""
    return {
        "median_ms": {k: runs[k][0] for k in (den, num)},
        # Per-round ratios of back-to-back steps: robust to load drifting on a shared box.
        "ratio": paired_ratio(list(runs[num][3]), list(runs[den][3])),
        "min_ratio": runs[num][2] / runs[den][2],  # least disturbed by other processes
    }


def overhead(reps: int, n_layers: int = 4, dim: int = 1024, train_batch: int = TRAIN_BATCH
             ) -> dict:
    """Each ratio from its own interleaved pair of step kinds.

    A mask-recompute step streams through far more memory than an ordinary step and
    leaves the caches cold for whatever runs next; interleaving all three kinds made the
    plain step (always right after a recompute) look slower and the ordinary overhead
    smaller than it is (1.06 three-way against 1.10 paired alone, same machine).
    """
    rising = lambda t: jnp.minimum(0.5 + 1e-5 * t, 0.9)  # noqa: E731  (changes every step)
    adam = optax.adam(1e-3)
    ordinary = optax.chain(adam, jol.prune(jol.magnitude_mask, jol.constant_sparsity(0.5)))
    recompute = optax.chain(adam, jol.prune(jol.magnitude_mask, rising))
    ordinary_runs = _timed_runs({"plain_adam": adam, "prune_ordinary": ordinary},
                                reps, n_layers, dim)
    # The same pair inside whole training steps (forward and backward on a batch of
    # 128): what a user's step pays. Each step is ~5x longer: fewer reps.
    train_reps = max(min(reps, 10), reps // 3)
    train_runs = _timed_runs({"plain_adam": adam, "prune_ordinary": ordinary},
                             train_reps, n_layers, dim, batch=train_batch)
    recompute_runs = _timed_runs({"prune_ordinary": ordinary, "prune_recompute": recompute},
                                 reps, n_layers, dim)
    # The sort-based reference is ~100x slower: fewer reps, against its own ordinary step.
    sort_reps = max(min(reps, 5), reps // 10)
    ref = _timed_runs(
        {"prune_ordinary": ordinary,
         "sort_recompute": optax.chain(adam, jol.prune(sort_magnitude_mask, rising))},
        sort_reps, n_layers, dim,
    )
    kernels = [recompute_runs["prune_recompute"][1][f"layer{i}"]["kernel"]
               for i in range(n_layers)]
    recompute_pair = _pair(recompute_runs, "prune_recompute", "prune_ordinary")
    # In that pair the ordinary step runs right after a recompute (cold caches), which
    # flatters the ratio; against the ordinary step of the first pair it is not flattered.
    recompute_pair["ratio_vs_first_pair_ordinary"] = {
        "statistic": "ratio of medians from two different pairs",
        "value": recompute_runs["prune_recompute"][0] / ordinary_runs["prune_ordinary"][0]}
    return {
        "setup": f"{n_layers} layers of {dim}x{dim} + bias, adam, jit, donated buffers; "
                 "each ratio from its own interleaved pair",
        "reps": reps,
        "ordinary_over_plain": _pair(ordinary_runs, "prune_ordinary", "plain_adam"),
        "ordinary_over_plain_train_step": {
            "batch": train_batch, "reps": train_reps,
            **_pair(train_runs, "prune_ordinary", "plain_adam"),
        },
        "recompute_over_ordinary": recompute_pair,
        "sort_reference": {
            "reps": sort_reps,
            **_pair(ref, "sort_recompute", "prune_ordinary"),
        },
        "targets": {"ordinary_over_plain": 1.05, "recompute_over_ordinary": 3.0},
        "recompute_final_sparsity": float(jol.sparsity(kernels).overall),
    }


# --- accuracy ---------------------------------------------------------------------------


def _kernel_sparsity(params, where) -> dict:
    rep = jol.sparsity(params, where=where)
    return {"overall": float(rep.overall), "nonzero": int(rep.overall_nonzero),
            "size": rep.size}


def accuracy(epochs: int, finetune_epochs: int, seed: int, only: tuple[str, ...] | None = None
             ) -> dict:
    """Dense, then fine-tuned with each pruning (``only``: those runs); carries its own
    ``provenance``."""
    data = load_digits(seed=seed)
    model = TeacherCNN()
    dense, _ = fit(model, data, optax.adam(1e-3), epochs=epochs, seed=seed)
    out = {"dense": evaluate(model, dense, data.test)}
    steps_per_epoch = len(data.train.y) // 64
    total = finetune_epochs * steps_per_epoch
    begin, end = steps_per_epoch, int(0.7 * total)  # ramp, then recover at final sparsity

    def divisible_by_4(path, leaf):
        del path
        return leaf.ndim >= 2 and leaf.shape[-2] % 4 == 0

    runs = {
        "unstructured_50": (jol.magnitude_mask, 0.5, None),
        "unstructured_90": (jol.magnitude_mask, 0.9, None),
        "nm_2_4": (functools.partial(jol.nm_mask, n=2, m=4), 0.5, divisible_by_4),
    }
    if only is not None:
        runs = {name: runs[name] for name in only}
    for name, (mask_fn, final, where) in runs.items():
        schedule = jol.polynomial_sparsity(0.0, final, begin, end, frequency=10)
        tx = optax.chain(optax.adam(5e-4), jol.prune(mask_fn, schedule, where=where))
        _, hist = fit(model, data, tx, epochs=finetune_epochs, seed=seed, variables=dense)
        last = hist["final_state"]
        variables = {"params": last.params, **last.model_state}
        res = evaluate(model, variables, data.test)
        res["drop_points"] = 100 * (out["dense"]["accuracy"] - res["accuracy"])
        res["kernel_sparsity"] = _kernel_sparsity(last.params, where)
        if name == "nm_2_4":
            res["nm_valid"] = _nm_valid(last.params, where)
        out[name] = res
    out["targets_points"] = {"unstructured_50": 1.5, "unstructured_90": 1.5, "nm_2_4": 1.0}
    # This section may be copied forward by --overhead-only runs: it says where it came from.
    out["provenance"] = provenance()
    return out


def _nm_valid(params, where) -> bool:
    """Every group of 4 along the contraction axis holds at most 2 nonzeros."""
    for _, leaf, choice in _select.leaf_choices(params, where):
        if choice is not False:
            groups = np.moveaxis(np.asarray(leaf), -2, -1).reshape(-1, 4)
            if (groups != 0).sum(-1).max() > 2:
                return False
    return True


def _previous() -> dict:
    """The results file as it stands ({} if absent or unreadable)."""
    try:
        with open(RESULTS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs and repetitions (JSON to a temporary folder)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--overhead-only", "--skip-accuracy", dest="skip_accuracy",
                        action="store_true",
                        help="measure only the overhead; keep the accuracy already in the JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = add_common_args(parser).parse_args()
    args.smoke = args.smoke or args.quick  # neither may overwrite the real figures
    if args.smoke and not args.quick:
        reps = args.reps or 3
        over = overhead(reps, n_layers=2, dim=64, train_batch=8)
        epochs, ft = 1, 2  # the schedule ramps after the first fine-tuning epoch
        # One fine-tuning run: 2:4 goes through every line of the loop (a `where`, the N:M
        # check) that the unstructured runs do; each run is a fresh compile.
        only = ("nm_2_4",)
    else:
        reps = args.reps or (20 if args.quick else 150)
        over = overhead(reps)
        epochs, ft = (4, 4) if args.quick else (20, 15)
        only = None
    result = {
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()[:1]], "cpus": os.cpu_count()},
        "overhead": over,
        "sections_measured": ["overhead"],
    }
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(epochs, ft, args.seed, only)
        result["sections_measured"].append("accuracy")
    elif "accuracy" in _previous():  # measured by an earlier full run: keep it, and say so
        kept = _previous()["accuracy"]
        kept.setdefault("provenance", {"commit": "unknown",
                                       "note": "measured before provenance was recorded"})
        result["accuracy"] = kept
    emit("pruning", result, out_dir=output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
