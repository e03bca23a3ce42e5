"""Histogram passes over int32 scores, and the exact two-pass radix select built on them.

The primitives both selects share: ``pruning.select`` (which picks a method by input size)
and ``pruning.sampled`` (whose one-pass select falls back to ``radix_keep``) import them from
here, so neither imports the other's module back (no import cycle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_HIGH_BITS = 16  # top digit: scores >> 15 < 2**16 because scores < 2**31
_LOW_BITS = 15
_LOW_MASK = (1 << _LOW_BITS) - 1
_ROW = 256  # prefix sums over histograms are done as (rows, _ROW) two-level scans

# ``make_scores(after=None, only=None)`` builds the score arrays where it is called (only
# array ``only``'s, as a one-element list, when given). Each pass of a select calls it
# afresh with the previous pass's result as ``after``: that orders the recomputation
# after it and keeps XLA from merging the passes' identical computations into one array
# of every score kept alive across all passes (a whole-tree int32 temporary;
# ``benchmarks/scale.py`` measured 2.2x the tree's bytes before). Recomputing a score is
# a cheap elementwise map fused into each pass.
MakeScores = Callable[..., list[jax.Array]]
# ``view(f)``: each array's scores at ``f(flat index range)``, e.g. ``lambda a: a[::64]``,
# built from that view of the operands where possible (see ``score_views``).
ScoreView = Callable[[Callable[[jax.Array], jax.Array]], list[jax.Array]]


def given_scores(scores: Sequence[jax.Array]) -> MakeScores:
    """A ``MakeScores`` of arrays already built (they are alive throughout anyway)."""
    return lambda after=None, only=None: list(scores) if only is None else [scores[only]]


def first_reaching(hist: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Smallest bin ``b`` with ``sum(hist[:b+1]) >= target`` and ``sum(hist[:b])``.

    Two-level prefix sums (rows, then one row) avoid a long cumsum, which is slow on CPU.
    """
    rows = hist.reshape(-1, _ROW)
    row_tot = jnp.dot(rows, jnp.ones((_ROW,), jnp.int32), preferred_element_type=jnp.int32)
    row_cum = jnp.cumsum(row_tot)
    r = jnp.minimum(jnp.sum(row_cum < target), rows.shape[0] - 1)
    before_row = row_cum[r] - row_tot[r]
    within = before_row + jnp.cumsum(rows[r])
    c = jnp.minimum(jnp.sum(within < target), _ROW - 1)
    return r * _ROW + c, within[c] - rows[r, c]


_SCATTER_DIMS = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)


def histogram(digits: Sequence[jax.Array], length: int) -> jax.Array:
    """Counts of each digit value, summed over arrays; every digit must be in ``[0, length)``.

    A raw ``lax.scatter_add`` promising in-bounds indices: ``.at[].add`` would first copy
    the indices to wrap negative ones, an extra pass over the data.
    Digits keep their shape (each entry is its own index vector): flattening an array
    sharded along a minor axis would gather it, while a scatter-add of sharded digits
    into a replicated histogram partitions into per-shard histograms and one all-reduce.
    """
    hist = jnp.zeros((length,), jnp.int32)
    for d in digits:
        hist = _count_into(hist, d)
    return hist


def _count_into(hist: jax.Array, d: jax.Array) -> jax.Array:
    ones = jnp.ones(d.shape, jnp.int32)
    return lax.scatter_add(
        hist, d[..., None], ones, _SCATTER_DIMS, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def histogram_in_order(
    make_digits: Callable[[jax.Array, int], jax.Array], count: int, length: int
) -> jax.Array:
    """``histogram`` of ``count`` digit arrays built one at a time: ``make_digits(hist, i)``
    makes array ``i``'s digits once ``hist`` holds the counts of the arrays before it.

    XLA schedules independent work in any order, and left free it may build every
    array's digits before the first scatter-add: a whole-tree temporary. Building each
    from scores ordered after ``hist`` (``MakeScores``'s ``after``) keeps one array's
    digits alive at a time.
    """
    hist = jnp.zeros((length,), jnp.int32)
    for i in range(count):
        hist = _count_into(hist, make_digits(hist, i))
    return hist


_SPREAD = 16


def spread_lane(shape: tuple[int, ...], lanes: int) -> jax.Array:
    """A counter index in ``[0, lanes)`` per entry, cycling along the last axis."""
    if not shape:
        return jnp.zeros((), jnp.int32)
    return lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) & (lanes - 1)


def _spread_zero(digit: jax.Array) -> jax.Array:
    """Moves digit 0 (already-pruned entries, often most of them) to 16 counters chosen by
    position, and the others up by 15: scatter-adds into one counter serialise on it."""
    return jnp.where(digit == 0, spread_lane(digit.shape, _SPREAD), digit + _SPREAD - 1)


def _merge_spread(hist: jax.Array) -> jax.Array:
    """Undoes ``_spread_zero`` on a histogram: back to one count per digit."""
    merged = jnp.concatenate([hist[:_SPREAD].sum(keepdims=True), hist[_SPREAD:]])
    return merged[: 1 << _HIGH_BITS]


def radix_threshold(
    make_scores: MakeScores, k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(t, below, equal)``: the k-th lowest score (k >= 1), how many are < t and == t."""
    count = len(jax.eval_shape(make_scores))

    def high_digits(hist, i):
        (s,) = make_scores(hist, only=i)
        return _spread_zero(s >> _LOW_BITS)

    high = _merge_spread(histogram_in_order(high_digits, count, (1 << _HIGH_BITS) + _ROW))
    b_high, below_high = first_reaching(high, k)

    def low_digits(hist, i):  # bin 2**15 collects the other buckets
        (s,) = make_scores((b_high, hist), only=i)
        return jnp.where((s >> _LOW_BITS) == b_high, s & _LOW_MASK, 1 << _LOW_BITS)

    low = histogram_in_order(low_digits, count, (1 << _LOW_BITS) + _ROW)
    b_low, below_low = first_reaching(low, k - below_high)
    return (b_high << _LOW_BITS) | b_low, below_high + below_low, low[b_low]


def _nth_true_end(flag: jax.Array, n: jax.Array) -> jax.Array:
    """Smallest ``i`` with ``sum(flag.ravel()[:i]) == n`` for ``1 <= n <= sum(flag)``."""
    flat = flag.reshape(-1)
    size = flat.shape[0]
    row = min(1024, size)
    pad = (-size) % row
    rows = jnp.concatenate([flat, jnp.zeros((pad,), bool)]).reshape(-1, row).astype(jnp.int32)
    row_tot = rows.sum(axis=1)
    row_cum = jnp.cumsum(row_tot)
    r = jnp.sum(row_cum < n)
    within = row_cum[r] - row_tot[r] + jnp.cumsum(lax.dynamic_index_in_dim(rows, r, 0, False))
    return r * row + jnp.sum(within < n) + 1


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each entry's row-major flat index, built from per-axis iotas.

    ``iota(size).reshape(shape)`` is the same numbers, but reshaping a flat iota into an
    array sharded along a minor axis is a data movement; a sum of broadcast iotas is
    elementwise, so every shard builds its own indices.
    """
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return idx


_NO_INDEX = (1 << 31) - 1


def _nth_true_index_end(flag: jax.Array, n: jax.Array) -> jax.Array:
    """``_nth_true_end`` by a radix select of the flagged entries' flat indices: two
    histogram passes, no flattening, so it runs shard-local on a sharded ``flag``."""
    index = jnp.where(flag, flat_index(flag.shape), _NO_INDEX)
    nth, _, _ = radix_threshold(given_scores([index]), n)
    return nth + 1


def _tie_cuts(
    make_ties: Callable[[int, jax.Array | None], jax.Array], sizes: Sequence[int], need: jax.Array, *,
    shard_local: bool = False,
) -> list[jax.Array]:
    """Per array, the flat index below which ties are pruned so ``need`` are pruned in total.

    ``make_ties(i, after)`` builds array ``i``'s tie flags where they are used (in its
    count, then inside its own branch), so no two arrays' flags are alive at once.
    """
    counts: list[jax.Array] = []
    for i in range(len(sizes)):  # each count ordered after the one before (see MakeScores)
        counts.append(jnp.sum(make_ties(i, counts[-1] if counts else None), dtype=jnp.int32))
    nth_end = _nth_true_index_end if shard_local else _nth_true_end
    cuts, before = [], jnp.int32(0)
    for i, (c, size) in enumerate(zip(counts, sizes)):
        mine = jnp.clip(need - before, 0, c)
        cut = lax.cond(
            (mine > 0) & (mine < c),
            lambda i=i, mine=mine: nth_end(make_ties(i, None), mine),
            lambda mine=mine, size=size: jnp.where(mine > 0, size, 0).astype(jnp.int32),
        )
        cuts.append(cut)
        before = before + c
    return cuts


def radix_keep(
    make_scores: MakeScores, k: jax.Array, *, shard_local: bool = False
) -> list[jax.Array]:
    """Exact two-pass radix select (any ``k`` in ``[0, total]``).

    Every step is elementwise, a reduction or a scatter-add into a small replicated
    histogram, so on arrays sharded over a mesh each device works on its own shard and
    only histograms and counts cross devices. ``shard_local=True`` also finds the tie cut
    by a radix select of flat indices instead of a prefix sum over the flattened ties.
    """
    t, below, equal = radix_threshold(make_scores, jnp.maximum(k, 1))
    need = k - below  # how many scores equal to t are pruned, in position order
    sizes = [math.prod(s.shape) for s in jax.eval_shape(make_scores)]

    def ties(i, after):
        (s,) = make_scores((t, after) if after is not None else t, only=i)
        return s == t

    cuts = lax.cond(
        need >= equal,
        lambda: [jnp.int32(size) for size in sizes],
        lambda: _tie_cuts(ties, sizes, need, shard_local=shard_local),
    )
    keep = []
    for s, cut in zip(make_scores((t, cuts)), cuts):
        idx = flat_index(s.shape)
        pruned = (s < t) | ((s == t) & (idx < cut))
        keep.append(~pruned)
    return keep
