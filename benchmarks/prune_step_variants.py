"""Where the cost of an ordinary ``prune`` step goes: variants of one optimizer step, side by side.

Same set-up as ``pruning.py``'s overhead section (4 layers of 1024x1024 plus biases, adam,
jitted steps with donated buffers), all variants timed interleaved in one process:

* ``plain``: adam alone;
* ``prune``: ``chain(adam, prune(magnitude_mask, 0.5))`` (masks unchanged: ordinary steps);
* ``prune_fixed``: the same with a fixed mask tree, so the ``lax.cond`` branch is trivial;
* ``mask_only``: adam, then ``where(mask, u, -p)`` with the masks carried as plain state;
* ``mask_in_cond``: the same with the masks passed through a never-taken ``lax.cond``;
* ``packed_mask``: ``mask_only`` on the kernels only, with bit-packed masks (1 bit a weight);
* ``row_mask``: ``mask_only`` with one 1024-entry mask row per kernel, broadcast over its
  rows, so the mask stays in L1: the cost of the select itself, without the mask's traffic.

Prints JSON: median ms per step and the ratio to ``plain`` as the median of per-round ratios
with its spread (``_util.paired_ratio``; the ratio of the medians alongside), and writes
``benchmarks/results/prune_step_variants.json``.
Run: ``python benchmarks/prune_step_variants.py [--reps N] [--smoke]`` (``--smoke``: 2 layers
of 64x64, 3 steps, JSON to a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from jax import lax

import jaxopt_lab as jol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import add_common_args, emit, output_dir, paired_ratio  # noqa: E402
from pruning import _layers, _timed_runs  # noqa: E402  (the same step and timing loop)


def _mask_of(x):
    return jnp.abs(x) > 0.01 if x.ndim == 2 else jnp.ones(x.shape, bool)


def _unpack(bits, shape):
    return ((bits[..., :, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1).reshape(shape) > 0


def _masking(kind: str) -> optax.GradientTransformation:
    """``where(mask, u, -p)`` after the optimizer, masks held as the variant says."""
    is_none = lambda x: x is None  # noqa: E731

    def init(params):
        if kind == "packed_mask":
            return jax.tree.map(lambda x: jnp.packbits(_mask_of(x), axis=-1, bitorder="little")
                                if x.ndim == 2 else None, params)
        if kind == "row_mask":
            return jax.tree.map(lambda x: _mask_of(x)[0] if x.ndim == 2 else _mask_of(x), params)
        return jax.tree.map(_mask_of, params)

    def update(updates, masks, params):
        if kind == "mask_in_cond":  # never taken: the total update is never that large
            never = jnp.sum(updates["layer0"]["bias"]) > 1e30
            masks = lax.cond(never, lambda: jax.tree.map(jnp.logical_not, masks), lambda: masks)
        if kind == "packed_mask":
            def masked(u, p, m):
                return u if m is None else jnp.where(_unpack(m, u.shape), u, -p)
            return jax.tree.map(masked, updates, params, masks, is_leaf=is_none), masks
        return jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks), masks

    return optax.GradientTransformation(init, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 200)")
    args = add_common_args(parser).parse_args()
    n_layers, dim, reps = (2, 64, args.reps or 3) if args.smoke else (4, 1024, args.reps or 200)
    adam = optax.adam(1e-3)
    fixed = jax.tree.map(_mask_of, _layers(n_layers, dim, 0))
    txs = {
        "plain": adam,
        "prune": optax.chain(adam, jol.prune(jol.magnitude_mask, 0.5)),
        "prune_fixed": optax.chain(adam, jol.prune(lambda tree, s: fixed, 0.5)),
        **{k: optax.chain(adam, _masking(k)) for k in ("mask_only", "mask_in_cond",
                                                       "packed_mask", "row_mask")},
    }
    runs = _timed_runs(txs, reps, n_layers=n_layers, dim=dim)
    plain = list(runs["plain"][3])
    emit("prune_step_variants", {
        "setup": f"{n_layers} layers of {dim}x{dim} + bias, adam, jit, donated buffers; all "
                 "variants interleaved",
        "reps": reps,
        "variants": {k: {"median_ms": r[0], "ratio_to_plain": paired_ratio(list(r[3]), plain)}
                     for k, r in runs.items()},
    }, out_dir=output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
