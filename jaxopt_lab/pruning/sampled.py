"""One-pass exact selection for large inputs: a sample brackets the k-th score, one
fine histogram over the bracket finds it, exact fallbacks cover every other case.

1. A strided sample of ``SAMPLE`` scores is sorted; its quantiles around ``k / n`` with
   a 4 sigma margin give a score range ``[lo, hi)`` that almost surely holds the k-th
   lowest score. When already-pruned entries (score 0) fill the window's low end, ``lo``
   is the exact smallest surviving score (one fused min pass) instead.
2. One scatter-add pass histograms all scores into ``BINS`` equal bins over that range,
   plus underflow and overflow counters: exact counts at every bin edge. (2**16 bins
   measured faster than 2**14 or 2**18: the histogram stays in cache.)
3. The bin holding the k-th score usually holds only it, so pruning "everything below
   that bin's upper edge" is already exact. If instead exactly one entry of the bin must
   go, it is the bin's lexicographic ``(score, position)`` minimum (one argmin pass).
   Anything else (bracket missed, heavy ties) falls back to the two-pass radix select.

Every branch prunes exactly the k lowest (ties by position) -- the sample only decides
how fast. Typical cost: one histogram pass plus the final mask, against two histogram
passes for the radix select and ~50 for a sort. The score arrays are never written out:
the sample and the min pass score views of the operands (``select.score_views``) and the
histogram's digits are computed from the operands, so each pass reads the weights once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.pruning import radix

SAMPLE = 4096
BINS = 1 << 16  # _shift_for assumes this
# Histogram layout: underflow [0, _SPREAD), bins [_SPREAD, _SPREAD + BINS), overflow after.
# Under- and overflow are spread over _SPREAD counters by position: most entries land
# there, and scatter-adds into one counter serialise on it (~3x slower on CPU).
_SPREAD = 16
_LENGTH = BINS + 256  # >= BINS + 2 * _SPREAD, a multiple of select's row length
_SIGMAS = 4.0
_MAX = jnp.iinfo(jnp.int32).max
_PARTS = 16  # the smallest-survivor pass first folds each array's 16 parts elementwise


def _sample(view: radix.ScoreView, total: int) -> jax.Array:
    stride = max(1, total // SAMPLE)
    return jnp.sort(jnp.concatenate(view(lambda a: a[::stride])))


def _min_positive(view: radix.ScoreView) -> jax.Array:
    """Smallest score > 0 over all arrays (``_MAX`` if none).

    XLA writes a reduction's input out before reducing it; folding each array's
    ``_PARTS`` contiguous parts together with elementwise minima first keeps the scoring
    and most of the work in one fused pass, leaving ``1/_PARTS`` of the data to reduce.
    """
    positive = lambda s: jnp.where(s > 0, s, _MAX)  # noqa: E731
    head = lambda a: a[: a.shape[0] // _PARTS * _PARTS].reshape(_PARTS, -1)  # noqa: E731
    parts = [view(lambda a, i=i: head(a)[i]) for i in range(_PARTS)]
    tails = view(lambda a: a[a.shape[0] // _PARTS * _PARTS :])
    mins = [jnp.int32(_MAX)]
    for per_array, tail in zip(zip(*parts), tails):
        if per_array[0].size:
            mins.append(jnp.min(functools.reduce(jnp.minimum, map(positive, per_array))))
        if tail.size:
            mins.append(jnp.min(positive(tail)))
    return functools.reduce(jnp.minimum, mins)


def _bracket(
    view: radix.ScoreView, sample: jax.Array, k: jax.Array, total: int
) -> tuple[jax.Array, jax.Array]:
    """Score range ``[lo, lo + span)`` around the sample quantile ``k / total``."""
    m = sample.shape[0]
    p = k.astype(jnp.float32) / total
    centre = p * m
    margin = _SIGMAS * jnp.sqrt(m * p * (1.0 - p)) + 2.0
    r_lo = jnp.floor(centre - margin).astype(jnp.int32)
    r_hi = jnp.ceil(centre + margin).astype(jnp.int32)
    lo = jnp.where(r_lo < 0, 0, sample[jnp.clip(r_lo, 0, m - 1)])
    hi = jnp.where(r_hi >= m, _MAX, sample[jnp.clip(r_hi, 0, m - 1)])
    # Below the window lie already-pruned entries (score 0): along a rising schedule the
    # k-th is then among the smallest survivors, below the sample's smallest. Start the
    # range at the exact smallest survivor (one min pass) so the bins stay fine there.
    # The branch builds its own scores: captured score arrays would be cond operands,
    # which XLA must write out (an extra pass over the data on every recompute).
    lo = lax.cond(lo <= 0, lambda: _min_positive(view), lambda: lo)
    return lo, jnp.maximum(hi - lo, 1)


def _digits(s: jax.Array, lo: jax.Array, shift: jax.Array) -> jax.Array:
    """Histogram bin of each score: ``_SPREAD + (s - lo) >> shift`` inside the range,
    an underflow or overflow counter (chosen by position) outside it."""
    inside = jnp.right_shift(jnp.maximum(s - lo, 0), shift)
    lane = radix.spread_lane(s.shape, _SPREAD)
    above = inside >= BINS
    return jnp.where(s < lo, lane, jnp.where(above, BINS + _SPREAD + lane, inside + _SPREAD))


def _shift_for(span: jax.Array) -> jax.Array:
    """Smallest shift with ``span >> shift < BINS`` (bins of width ``2**shift``)."""
    need = (span - 1) >> 16  # BINS == 2**16
    return jnp.where(need > 0, 32 - lax.clz(need), 0).astype(jnp.int32)


def _lexicographic_min_cut(make_scores, shapes, lo, shift, j) -> list[jax.Array]:
    """Prunes everything below bin ``j`` plus the first (score, position) minimum in it.

    Each array's pass is ordered after the previous one's result (``radix.MakeScores``),
    so one array's bin-``j`` scores are alive at a time.
    """
    at, mins = [], []
    for i in range(len(shapes)):
        (s,) = make_scores((j, at[-1]) if at else j, only=i)
        in_bin = jnp.where(_digits(s, lo, shift) == j, s, _MAX).reshape(-1)
        pos = jnp.argmin(in_bin)  # the first position of the minimum: one pass
        at.append(pos)
        mins.append(in_bin[pos])
    best = functools.reduce(jnp.minimum, mins)
    taken = jnp.bool_(False)
    out = []
    for s, v, pos in zip(make_scores((j, best)), mins, at):
        mine = (v == best) & ~taken
        taken = taken | mine
        idx = radix.flat_index(s.shape)
        out.append(~((_digits(s, lo, shift) < j) | (mine & (idx == pos))))
    return out


def sampled_keep(
    make_scores: radix.MakeScores, k: jax.Array, view: radix.ScoreView | None = None
) -> list[jax.Array]:
    """Same contract as ``select.keep_lowest`` (``0 <= k <= total``).

    ``view`` (see ``select.score_views``) builds the sample and the smallest-survivor
    pass from views of the operands; by default they are views of ``make_scores()``.
    """
    if view is None:
        view = lambda f: [f(s.reshape(-1)) for s in make_scores()]  # noqa: E731
    shapes = [s.shape for s in jax.eval_shape(make_scores)]
    total = sum(math.prod(shape) for shape in shapes)
    k_wanted, k = k, jnp.maximum(k, 1)
    lo, span = _bracket(view, _sample(view, total), k, total)
    shift = _shift_for(span)
    # Digits are rebuilt from the operands wherever they are used, each time ordered
    # after the result before (``radix.MakeScores``): built once and shared, every
    # array's digits would be written out and kept alive together.
    hist = radix.histogram_in_order(
        lambda h, i: _digits(make_scores((lo, shift, h), only=i)[0], lo, shift),
        len(shapes), _LENGTH)
    j, below = radix.first_reaching(hist, k)
    rank, count = k - below, hist[j]  # the k-th is the rank-th (1-based) of bin j
    fits = (j >= _SPREAD) & (j < _SPREAD + BINS)
    case = jnp.where(fits & (rank == count), 0, jnp.where(fits & (rank == 1), 1, 2))
    return lax.switch(
        jnp.where(k_wanted <= 0, 3, case),
        [
            lambda: [_digits(s, lo, shift) > j for s in make_scores(j)],
            lambda: _lexicographic_min_cut(make_scores, shapes, lo, shift, j),
            lambda: radix.radix_keep(make_scores, k),
            lambda: [jnp.ones(shape, bool) for shape in shapes],
        ],
    )
