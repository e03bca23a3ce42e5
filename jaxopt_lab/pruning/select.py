"""Exact "prune the k lowest scores" selection without sorting the whole tensor.

Every mask function reduces its ranking to non-negative int32 *scores* (for magnitudes,
the bit pattern of ``|w|`` as float32, which is monotone in the value) and asks for the
``k`` lowest to be pruned, ties broken by position (leaf order, then flat index), so the
count is exact and the result deterministic. Three exact methods, by input size:

* small (< ``SORT_BELOW``): a stable argsort;
* medium: a two-pass radix select -- a 65,536-bin histogram of the top 16 bits finds the
  bucket holding the k-th score, a histogram of the low 15 bits inside it pins it down;
* large (>= ``SAMPLED_FROM``): :mod:`jaxopt_lab.pruning.sampled`, usually one histogram
  pass, falling back to the radix select when its sample-based guess does not settle it.

Arrays on a multi-device mesh (``NamedSharding``, eager or under ``jax.jit``) always take
the radix select: its passes are elementwise maps, reductions and scatter-adds into a
replicated histogram, which XLA partitions into per-shard work plus an all-reduce of the
histograms and counts, so no leaf is gathered. The sort and the sample flatten the
arrays (a gather when a leaf is sharded along a minor axis). All methods are exact with
the same tie-break, so the masks are equal bit for bit.

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

from jaxopt_lab.pruning import sampled
# Re-exported: the primitives live in pruning.radix so that pruning.sampled needs only them.
from jaxopt_lab.pruning.radix import (  # noqa: F401
    MakeScores,
    ScoreView,
    first_reaching,
    histogram,
    radix_keep,
    radix_threshold,
    spread_lane,
)

# Below this many scores in total a stable argsort beats two histogram passes; from
# SAMPLED_FROM on, the sampled one-pass select (``pruning.sampled``) beats the radix select.
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


def on_mesh(arrays: Sequence) -> bool:
    """Whether any array lives on a mesh of more than one device (concrete or traced).

    Under ``jax.jit`` a traced value's abstract sharding still names the mesh its inputs
    were sharded over (the partition spec itself is only known to XLA's propagation).
    """
    for a in arrays:
        if a is None or isinstance(a, (np.ndarray, np.generic, int, float, bool)):
            continue
        try:
            mesh = jax.typeof(a).sharding.mesh
        except (AttributeError, TypeError):
            mesh = None
        if mesh is not None and not mesh.empty and mesh.size > 1:
            return True
        sharding = getattr(a, "sharding", None)  # a concrete array without a mesh aval
        if sharding is not None and not isinstance(a, jax.core.Tracer):
            if len(sharding.device_set) > 1:
                return True
    return False


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

    def make_scores(after=None, only=None):
        ops = [operands[i] for i in (full if only is None else [full[only]])]
        if after is not None:  # a later pass: see radix.MakeScores
            ops = _after(ops, after)
        return [score(*o) for o in ops]

    total = sum(math.prod(shapes[i]) for i in full)
    out = [jnp.ones(sh, bool) for sh in shapes]
    if total == 0:
        return out
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
    if on_mesh([o for ops in operands for o in ops]):
        keep = radix_keep(make_scores, k, shard_local=True)
    elif total < SORT_BELOW:
        keep = sort_keep(make_scores(), k)
    elif total < SAMPLED_FROM:
        keep = radix_keep(make_scores, k)
    else:
        view = score_views(kind, [operands[i] for i in full], make_scores)
        keep = sampled.sampled_keep(make_scores, k, view)
    for i, m in zip(full, keep):
        out[i] = m
    return out


def _after(tree, after):
    """``tree``, its array leaves made to depend on ``after`` (non-negative int arrays).

    ``lax.optimization_barrier`` would say this, but XLA's CPU pipeline drops barriers
    before scheduling (measured: every leaf's digits were then built before the first
    scatter-add). So each leaf goes through ``where(never, 0, leaf)``, with ``never`` a
    scalar read from ``after`` that is always False (the bitwise OR of non-negative
    ints is never INT32_MIN) but that XLA cannot fold: a real data dependency, fused into
    the pass's elementwise work, that changes no value. PRNG keys and Python values are
    passed as they are.
    """
    firsts = [jnp.ravel(a)[0].astype(jnp.int32) for a in jax.tree.leaves(after)]
    never = functools.reduce(jnp.bitwise_or, firsts) == jnp.iinfo(jnp.int32).min

    def tie(x):
        if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            return jnp.where(never, jnp.zeros((), x.dtype), x)
        return x

    return jax.tree.map(tie, tree)


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
