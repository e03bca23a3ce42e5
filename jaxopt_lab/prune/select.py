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

import fractions
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Below this many scores in total a stable argsort beats two histogram passes; from
# SAMPLED_FROM on, the sampled one-pass select (``prune.sampled``) beats the radix select.
SORT_BELOW = 4096
SAMPLED_FROM = 1 << 16
_HIGH_BITS = 16  # top digit: scores >> 15 < 2**16 because scores < 2**31
_LOW_BITS = 15
_LOW_MASK = (1 << _LOW_BITS) - 1
_ROW = 256  # prefix sums over histograms are done as (rows, _ROW) two-level scans

# Scores: 0 is reserved for "already pruned" (ranks below everything), magnitudes
# start at 1; NaN ranks above +inf so a NaN weight is never silently chosen to prune.
_INF_BITS = 0x7F800000
MakeScores = Callable[[], list[jax.Array]]  # builds the score arrays where it is called
# ``view(f)``: each array's scores at ``f(flat index range)``, e.g. ``lambda a: a[::64]``,
# built from that view of the operands where possible (see ``score_views``).
ScoreView = Callable[[Callable[[jax.Array], jax.Array]], list[jax.Array]]


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
    """
    hist = jnp.zeros((length,), jnp.int32)
    for d in digits:
        flat = d.reshape(-1, 1)
        ones = jnp.ones((flat.shape[0],), jnp.int32)
        hist = lax.scatter_add(
            hist, flat, ones, _SCATTER_DIMS, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
        )
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
    scores: Sequence[jax.Array], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(t, below, equal)``: the k-th lowest score (k >= 1), how many are < t and == t."""
    high = _merge_spread(histogram([_spread_zero(s >> _LOW_BITS) for s in scores],
                                   (1 << _HIGH_BITS) + _ROW))
    b_high, below_high = first_reaching(high, k)
    lows = [jnp.where((s >> _LOW_BITS) == b_high, s & _LOW_MASK, 1 << _LOW_BITS) for s in scores]
    low = histogram(lows, (1 << _LOW_BITS) + _ROW)  # bin 2**15 collects the other buckets
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


def _tie_cuts(ties: Sequence[jax.Array], need: jax.Array) -> list[jax.Array]:
    """Per array, the flat index below which ties are pruned so ``need`` are pruned in total."""
    counts = [jnp.sum(t, dtype=jnp.int32) for t in ties]
    cuts, before = [], jnp.int32(0)
    for t, c in zip(ties, counts):
        mine = jnp.clip(need - before, 0, c)
        cut = lax.cond(
            (mine > 0) & (mine < c),
            lambda t=t, mine=mine: _nth_true_end(t, mine),
            lambda t=t, mine=mine: jnp.where(mine > 0, t.size, 0).astype(jnp.int32),
        )
        cuts.append(cut)
        before = before + c
    return cuts


def radix_keep(make_scores: MakeScores, k: jax.Array) -> list[jax.Array]:
    """Exact two-pass radix select (any ``k`` in ``[0, total]``)."""
    scores = make_scores()
    t, below, equal = radix_threshold(scores, jnp.maximum(k, 1))
    need = k - below  # how many scores equal to t are pruned, in position order
    cuts = lax.cond(
        need >= equal,
        lambda: [jnp.int32(s.size) for s in scores],
        lambda: _tie_cuts([s == t for s in scores], need),
    )
    keep = []
    for s, cut in zip(scores, cuts):
        idx = lax.broadcasted_iota(jnp.int32, (s.size,), 0).reshape(s.shape)
        pruned = (s < t) | ((s == t) & (idx < cut))
        keep.append(~pruned)
    return keep


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
    from jaxopt_lab.prune import sampled  # noqa: PLC0415  (sampled builds on this module)

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
    """``floor(sparsity * size)`` as int32: the one definition every mask function uses.

    ``sparsity`` is read as float32, the precision a traced value has under ``jax.jit``
    (Python floats become float32 there), and the count is the *exact* floor of that
    float32 value times ``size`` -- no rounding of the product -- so eager and jitted
    calls prune the same number. The exact value is what is floored: ``0.7`` is float32
    ``0.699999988...``, so it prunes 6 of 10 (pass ``0.75`` or a count-exact fraction for
    a round number). Out-of-range traced values are clipped to ``[0, 1]``; a traced NaN
    counts ``size`` (everything pruned, so the fault shows instead of passing silently).

    Examples:
      >>> int(count_to_prune(0.29, 100)), int(jax.jit(count_to_prune, static_argnums=1)(0.29, 100))
      (28, 28)
    """
    if size < 0 or size >= 2**31:
        raise ValueError(f"size must be in [0, 2**31), got {size}")
    if isinstance(sparsity, (int, float, np.floating, np.integer)):
        s32 = np.float32(sparsity)
        if np.isnan(s32):
            return jnp.int32(size)
        s32 = min(max(s32, np.float32(0)), np.float32(1))
        return jnp.int32(math.floor(fractions.Fraction(float(s32)) * size))
    return _exact_count(jnp.asarray(sparsity, jnp.float32), size)


def _exact_count(s: jax.Array, size: int) -> jax.Array:
    """Exact ``floor(s * size)`` for a float32 ``s``, in int32 arithmetic only.

    A float32 product rounds (``float32(0.29) * 100`` is 29.0 though the exact product is
    28.99999...), and fused multiply-adds are not portable across backends, so the
    product ``mantissa * size`` is built from 12-bit limbs, each partial product below
    2**25, and shifted by the exponent.
    """
    nan = jnp.isnan(s)
    s = jnp.clip(jnp.where(nan, 0.0, s), 0.0, 1.0)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    biased = bits >> 23
    frac = bits & 0x7FFFFF
    mant = jnp.where(biased > 0, frac | 0x800000, frac)  # subnormals have no implicit bit
    shift = 150 - jnp.maximum(biased, 1)  # s = mant * 2**-shift, shift >= 23 for s <= 1
    m0, m1 = mant & 0xFFF, mant >> 12
    n0, n1, n2 = size & 0xFFF, (size >> 12) & 0xFFF, size >> 24
    limbs = [m0 * n0, m1 * n0 + m0 * n1, m1 * n1 + m0 * n2, m1 * n2]
    digits, carry = [], jnp.int32(0)
    for limb in limbs:  # base 2**12 digits of mant * size (< 2**55)
        total = limb + carry
        digits.append(total & 0xFFF)
        carry = total >> 12
    digits.append(carry)
    low = digits[0] | (digits[1] << 12)  # bits 0..23
    high = digits[2] | (digits[3] << 12) | (digits[4] << 24)  # bits 24..; < 2**31
    # shift == 23 only for s == 1, where the product is ``size`` itself.
    at_one = (high << 1) | (low >> 23)
    down = jnp.minimum(shift - 24, 31)
    count = jnp.where(shift == 23, at_one, jnp.where(down >= 31, 0, high >> jnp.maximum(down, 0)))
    return jnp.where(nan, jnp.int32(size), count).astype(jnp.int32)
