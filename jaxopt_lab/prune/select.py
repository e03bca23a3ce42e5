"""Exact "prune the k lowest scores" selection without sorting the whole tensor.

Every mask function reduces its ranking to non-negative int32 *scores* (for magnitudes,
the bit pattern of ``|w|`` as float32, which is monotone in the value) and asks for the
``k`` lowest to be pruned, ties broken by position (leaf order, then flat index), so the
count is exact and the result deterministic. Three exact methods, by input size:

* small (< ``SORT_BELOW``): a stable argsort;
* medium: a two-pass radix select -- a 65,536-bin histogram of the top 16 bits finds the
  bucket holding the k-th score, a histogram of the low 15 bits inside it pins it down;
* large (>= ``SAMPLED_FROM``): :mod:`jaxopt_lab.prune.sampled`, usually one histogram
  pass, falling back to the radix select when its sample-based guess does not settle it.

Each pass is one scatter-add over the data, so a recompute costs a few elementwise passes
where a full sort costs ~50 (``benchmarks/pruning.py`` measures it). Scores are built
inside the passes that read them (``score_views``), never stored as an extra array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.prune import sampled
# Re-exported: the primitives live in prune.radix so that prune.sampled needs only them.
from jaxopt_lab.prune.radix import (  # noqa: F401
    MakeScores,
    ScoreView,
    first_reaching,
    histogram,
    radix_keep,
    radix_threshold,
    spread_lane,
)

# Below this many scores in total a stable argsort beats two histogram passes; from
# SAMPLED_FROM on, the sampled one-pass select (``prune.sampled``) beats the radix select.
SORT_BELOW = 4096
SAMPLED_FROM = 1 << 16

# Scores: 0 is reserved for "already pruned" (ranks below everything), magnitudes
# start at 1; NaN ranks above +inf so a NaN weight is never silently chosen to prune.
_INF_BITS = 0x7F800000


def magnitude_scores(x: jax.Array, previous: jax.Array | None = None) -> jax.Array:
    """int32 scores ordered like ``|x|`` (NaN highest); ``previous == False`` scores 0."""
    mag = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    bits = lax.bitcast_convert_type(mag, jnp.int32)
    s = jnp.minimum(bits, _INF_BITS + 1) + 1
    if previous is not None:
        s = jnp.where(previous, s, 0)
    return s


def random_scores(key: jax.Array, shape, previous: jax.Array | None = None) -> jax.Array:
    """Uniform int32 scores in ``[1, 2**30]`` (``previous == False`` scores 0)."""
    bits = jax.random.bits(key, shape, jnp.uint32)
    s = (bits >> 2).astype(jnp.int32) + 1
    if previous is not None:
        s = jnp.where(previous, s, 0)
    return s


def sort_keep(scores: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Exact select by a stable argsort (for small inputs)."""
    flat = jnp.concatenate([s.reshape(-1) for s in scores])
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0], dtype=order.dtype))
    keep_flat = rank >= k
    out, start = [], 0
    for s in scores:
        out.append(keep_flat[start : start + s.size].reshape(s.shape))
        start += s.size
    return out


def _given(s, previous=None):
    return s if previous is None else jnp.where(previous, s, 0)


def _product(x, g, previous=None):
    return magnitude_scores(jnp.asarray(x, jnp.float32) * jnp.asarray(g, jnp.float32), previous)


def _random(key, x, previous=None):
    return random_scores(key, jnp.shape(x), previous)


# How each mask function turns its per-leaf operands into scores.
SCORE_KINDS: dict[str, Callable[..., jax.Array]] = {
    "given": _given,
    "magnitude": magnitude_scores,
    "product": _product,
    "random": _random,
}
# Kinds whose score of an entry depends only on the operands' entries at that position,
# so scores of strided operands are the strided scores ("random" draws per shape).
ELEMENTWISE_KINDS = frozenset({"given", "magnitude", "product"})


def score_views(kind: str, operands: Sequence[tuple], make_scores: MakeScores) -> ScoreView:
    """A ``ScoreView`` for ``keep_lowest``'s operands.

    XLA does not fuse an elementwise producer into a reduction, nor into two consumers
    where one is a slice: scoring the whole arrays and then slicing or reducing them
    writes every score out and reads it back. For elementwise kinds the view is taken of
    the operands instead, so the scores are computed inside the pass that uses them.
    """
    shapes = [s.shape for s in jax.eval_shape(make_scores)]
    if kind not in ELEMENTWISE_KINDS or any(
        o is not None and jnp.shape(o) != shape  # broadcasting operands: no view of them
        for ops, shape in zip(operands, shapes)
        for o in ops
    ):
        return lambda f: [f(s.reshape(-1)) for s in make_scores()]

    def view(f):
        flat = lambda o: None if o is None else f(jnp.asarray(o).reshape(-1))  # noqa: E731
        return [SCORE_KINDS[kind](*map(flat, ops)) for ops in operands]

    return view


@functools.partial(jax.jit, static_argnames="kind")  # eager calls compile once per shape
def keep_lowest(kind: str, operands: Sequence[tuple], k) -> list[jax.Array]:
    """Bool masks (True = keep) pruning exactly the ``k`` lowest scores of all arrays.

    Args:
      kind: a key of ``SCORE_KINDS``: how ``operands`` become int32 scores.
      operands: one tuple of arguments per array, e.g. ``(x, previous_mask_or_None)``.
      k: number to prune (possibly traced); clipped to ``[0, total size]``.

    Returns:
      One bool array per score array, ``total - k`` True in total; ties are pruned in
      order of array, then flat index. Scores are built inside the branches that need
      them, so nothing but the selected path reads the data.
    """
    score = SCORE_KINDS[kind]
    shapes = [s.shape for s in jax.eval_shape(lambda: [score(*ops) for ops in operands])]
    full = [i for i, sh in enumerate(shapes) if math.prod(sh)]  # empty arrays: nothing to do

    def make_scores():
        return [score(*operands[i]) for i in full]

    total = sum(math.prod(shapes[i]) for i in full)
    out = [jnp.ones(sh, bool) for sh in shapes]
    if total == 0:
        return out
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
    if total < SORT_BELOW:
        keep = sort_keep(make_scores(), k)
    elif total < SAMPLED_FROM:
        keep = radix_keep(make_scores, k)
    else:
        view = score_views(kind, [operands[i] for i in full], make_scores)
        keep = sampled.sampled_keep(make_scores, k, view)
    for i, m in zip(full, keep):
        out[i] = m
    return out


def keep_above_k_lowest(scores: Sequence[jax.Array], k) -> list[jax.Array]:
    """``keep_lowest`` on ready-made int32 score arrays."""
    return keep_lowest("given", [(s,) for s in scores], k)


def count_to_prune(sparsity, size: int) -> jax.Array:
    """``floor(sparsity * size)`` as int32, robust to float32 rounding of ``sparsity``.

    A Python float is used exactly; a traced value is nudged up by two float32 ulps so
    that, e.g., ``float32(0.7) * 10`` counts 7, not 6.
    """
    if isinstance(sparsity, (int, float)):
        return jnp.int32(math.floor(sparsity * size))
    s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    s = jnp.where(jnp.isnan(s), 0.0, s)
    return jnp.floor(s * size * (1.0 + 2.0**-22)).astype(jnp.int32).clip(0, size)
