"""The optimal-brain-surgeon sweep shared by GPTQ and SparseGPT (private).

Weights are a Flax-layout matrix ``W`` of shape ``(K, N)``: row ``k`` is one input channel
(the papers' column), so the sweep walks the rows. With ``U`` the upper Cholesky factor of
the damped ``H^-1`` (``H^-1 = U^T U``), row ``i`` is replaced by its quantized and/or
pruned value ``q`` and the error ``(w - q) / U[i, i]`` is spread onto the rows not yet
processed with weights ``U[i, i:]`` (Frantar et al. 2022, Algorithm 1; Frantar & Alistarh
2023, Algorithm 1). Updates are lazy: inside a block of ``B`` rows they go to the block,
and the rows after the block receive the whole block's errors as one matrix product.
"""

from __future__ import annotations

import fractions
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab.quant.affine import affine_codes, affine_params
from jaxopt_lab.quant.codes import pin_range_ends

INT_BITS = (2, 3, 4, 8)


class SweepResult(NamedTuple):
    """Output of `sweep` (in the original row order).

    ``weights``: the new float32 ``(K, N)`` weights (quantized values and exact zeros);
    ``codes``: ``int8`` codes or ``None``; ``scale``/``zero``: ``(G, N)`` quantizer
    parameters (``G = K // group_size``, or 1 per channel), ``zero`` ``None`` if symmetric;
    ``mask``: bool ``(K, N)``, True = kept; ``factor_ok``: whether the Cholesky factor of
    the damped ``H^-1`` is finite (False: the damped Hessian is not positive definite).
    """

    weights: jax.Array
    codes: jax.Array | None
    scale: jax.Array | None
    zero: jax.Array | None
    mask: jax.Array
    factor_ok: jax.Array | None = None


def damped_hinv_factor(h: jax.Array, damp: float) -> jax.Array:
    """Upper ``U`` with ``U^T U = (H_n + damp I)^-1 (1 + damp)``, ``H_n = H / mean diag H``.

    Dead inputs (``H[k, k] == 0``: the channel was always 0) get ``H_n[k, k] = 1`` as in
    the papers' code. The sweep only uses ratios of ``U`` entries, so the common factor
    ``1 / (1 + damp)`` changes nothing, and ``damp = inf`` gives ``U = I`` exactly: no error
    is propagated, which is round-to-nearest (magnitude pruning for SparseGPT).
    """
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    d = jnp.diag(h)
    dead = d <= 0
    mean = jnp.mean(jnp.where(dead, 0.0, d))
    hn = jnp.where(mean > 0, h / jnp.where(mean > 0, mean, 1.0), 0.0)
    hn = jnp.where(eye > 0, jnp.where(dead, 1.0, hn), hn)
    a = 1.0 / (1.0 + jnp.float32(damp))
    hd = a * hn + (1.0 - a) * eye
    low = jnp.linalg.cholesky(hd)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.triu(jnp.linalg.cholesky(hinv).T)


def _quantize_row(w, scale, zero, lo, hi, bits, symmetric):
    """Codes and values of one row with given parameters (as `jaxopt_lab.quantize`)."""
    codes = affine_codes(w, scale, zero, bits=bits, symmetric=symmetric)
    if not symmetric:
        # quantize_array pins the range ends to qmin/qmax; so must we, to equal it: the same
        # function, which leaves ends alone where an underflowing scale was clamped up.
        codes = pin_range_ends(w, codes, scale, zero, lo, hi, bits=bits)
        vals = (codes.astype(jnp.float32) - zero.astype(jnp.float32)) * scale
    else:
        vals = codes.astype(jnp.float32) * scale
    return codes, vals


# The reference GPTQ code's range search: shrink factors 1, 0.99, ..., 0.21 of the range,
# scored by sum |x_hat - x|^2.4 per column (its `mse=True`, grid 100, maxshrink 0.8).
CLIP_SHRINKS = tuple(1.0 - i / 100 for i in range(80))
CLIP_NORM = 2.4


def _params_of(lo, hi, bits, symmetric):
    scale, zero = affine_params(lo, hi, bits=bits, symmetric=symmetric)
    if zero is None:
        zero = jnp.zeros_like(scale, jnp.int8)
    return scale, zero


def _group_params(rows, bits, symmetric, clip_search=False):
    """Scale, zero point and range ``(lo, hi)`` per column of ``rows`` (``(g, N)``); with
    ``clip_search`` the range is shrunk to the factor of `CLIP_SHRINKS` that minimises
    each column's rounding error (so values beyond it are clipped)."""
    lo, hi = rows.min(0), rows.max(0)
    if not clip_search:
        return (*_params_of(lo, hi, bits, symmetric), lo, hi)

    def err(p):
        scale, zero = _params_of(p * lo, p * hi, bits, symmetric)
        scale, zero = scale[None], zero[None]
        codes = affine_codes(rows, scale, zero, bits=bits, symmetric=symmetric)
        vals = (codes.astype(jnp.float32) - zero.astype(jnp.float32)) * scale
        return jnp.sum(jnp.abs(vals - rows) ** CLIP_NORM, axis=0)

    shrinks = jnp.asarray(CLIP_SHRINKS, jnp.float32)
    errs = lax.map(err, shrinks)  # (len(CLIP_SHRINKS), N); a map keeps memory at one try
    best = shrinks[jnp.argmin(errs, axis=0)]  # first minimum: the widest range on ties
    lo, hi = best * lo, best * hi
    return (*_params_of(lo, hi, bits, symmetric), lo, hi)


def keep_top_per_column(score: jax.Array, n: int, *, keep_first_ties: bool = False
                         ) -> jax.Array:
    """Keeps the ``n`` largest of each column. Ties: the lower row index is pruned, or with
    ``keep_first_ties`` kept (`jaxopt_lab.nm_mask`'s convention)."""
    if keep_first_ties:
        return keep_top_per_column(score[::-1], n)[::-1]
    order = jnp.argsort(score, axis=0, stable=True)
    rank = jnp.argsort(order, axis=0, stable=True)
    return rank >= score.shape[0] - n


def keep_block(score: jax.Array, prune: int) -> jax.Array:
    """Prunes exactly ``prune`` lowest of the whole block (ties by flat index)."""
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0], dtype=order.dtype))
    return (rank >= prune).reshape(score.shape)


def _search(lo: int, hi: int, enough, steps: int) -> jax.Array:
    """Least ``t`` in ``(lo, hi]`` with ``enough(t)`` (``enough`` monotone, ``enough(hi)``
    true), by a fixed number of bisections (``steps >= log2(hi - lo)``)."""
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = enough(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return lax.fori_loop(0, steps, step, (jnp.int32(lo), jnp.int32(hi)))[1]


def keep_block_sharded(score: jax.Array, prune, *, axis_name, cols: jax.Array,
                       total_cols: int) -> jax.Array:
    """`keep_block` of a block whose columns are split over ``axis_name`` (in
    ``shard_map``): the same mask, with only scalar counts crossing devices.

    The pruned set is the ``prune`` lowest scores of the whole ``(nb, total_cols)`` block,
    ties by flat index ``row * total_cols + cols[j]``. Scores are ``>= 0`` (squares over
    positive diagonals), so they order as their int32 bit patterns; bisection finds the
    threshold score, then the last pruned flat index among the ties, each step one
    ``psum`` of a count.
    """
    bits = lax.bitcast_convert_type(score, jnp.int32)

    def count(sel):
        return lax.psum(jnp.sum(sel, dtype=jnp.int32), axis_name)

    top = 0x7F800000  # +inf: every finite non-negative score is at or below it
    t = _search(-1, top, lambda v: count(bits <= v) >= prune, 31)
    need = prune - count(bits < t)
    nb = score.shape[0]
    flat = jnp.arange(nb, dtype=jnp.int32)[:, None] * total_cols + cols[None, :]
    tie = bits == t
    last = _search(-1, nb * total_cols - 1, lambda f: count(tie & (flat <= f)) >= need,
                   max(1, (nb * total_cols).bit_length()))
    last = jnp.where(need > 0, last, -1)
    return ~((bits < t) | (tie & (flat <= last)))


def prune_count(sparsity: float, size: int) -> int:
    """``floor(sparsity * size)`` by the library's one definition (`count_to_prune`: the
    exact floor of float32 ``sparsity`` times ``size``). A float64 floor disagreed with it:
    ``0.9999999999999999`` of 16 pruned 15 where every mask function prunes 16."""
    # count_to_prune's host path in plain Python: it returns a jax scalar, which under
    # the sweep's jit trace would not be a concrete count.
    s32 = min(max(np.float32(sparsity), np.float32(0)), np.float32(1))
    return math.floor(fractions.Fraction(float(s32)) * int(size))


def block_rows(block_size: int, group_size: int | None, dynamic: bool, m: int | None) -> int:
    """Block length: a multiple of the dynamic group size and of ``m`` (groups never
    straddle blocks, so their scales and N:M choices see up-to-date rows)."""
    unit = math.lcm(group_size if dynamic else 1, m or 1)
    return unit * max(1, block_size // unit)


@functools.partial(
    jax.jit,
    static_argnames=("damp", "block_size", "bits", "symmetric", "group_size", "act_order",
                     "sparsity", "n", "m", "static_groups", "clip_search", "axis_name",
                     "total_cols"),
)
def sweep(w, h, *, damp: float, block_size: int, bits: int | None, symmetric: bool,
          group_size: int | None, act_order: bool, sparsity: float | None, n: int | None,
          m: int | None, static_groups: bool = False, clip_search: bool = False,
          axis_name: str | tuple[str, ...] | None = None, cols: jax.Array | None = None,
          total_cols: int | None = None) -> SweepResult:
    """GPTQ (``bits``) and/or SparseGPT (``sparsity`` or ``n:m``) on ``W`` (settings checked
    by the callers).

    ``axis_name``: inside ``shard_map`` over ``W``'s columns, the mesh axes they are split
    over. Every step works column by column except the weights' overall maximum
    (`_normalize`, reduced with ``pmax``) and unstructured pruning's per-block selection,
    which then runs as `keep_block_sharded` given ``cols`` (the global index of each local
    column) and ``total_cols`` (the kernel's ``N``).
    """
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k, ncol = w.shape
    if axis_name is None:
        total_cols = ncol
    w, shift = _normalize(w, damp, axis_name)
    quant = bits is not None
    g = group_size or k
    n_groups = k // g
    # Per-channel scales and act-order groups are fixed from the original weights ("static
    # groups"), so every group keeps one scale whatever order its rows are processed in.
    dynamic = quant and group_size is not None and not (act_order or static_groups)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    gidx = perm // g
    if quant:
        if dynamic:
            scale = jnp.ones((n_groups, ncol), jnp.float32)
            zero = jnp.zeros((n_groups, ncol), jnp.int8)
            lo = hi = jnp.zeros((n_groups, ncol), jnp.float32)
        else:
            scale, zero, lo, hi = jax.vmap(
                lambda r: _group_params(r, bits, symmetric, clip_search))(
                w.reshape(n_groups, g, ncol))
    wp = w[perm]
    u = damped_hinv_factor(h[perm][:, perm], damp)
    diag_u = jnp.diag(u)
    big_b = block_rows(block_size, group_size, dynamic, m)
    n_full, tail = divmod(k, big_b)
    # Rows pruned by each block (unstructured SparseGPT): exact integer counts, host-side.
    if sparsity is not None:
        ends = [min(b * big_b, k) for b in range(n_full + 2)]
        counts = jnp.asarray([prune_count(sparsity, total_cols * ends[b + 1])
                              - prune_count(sparsity, total_cols * ends[b])
                              for b in range(n_full + 1)], jnp.int32)
    if not quant:
        scale = zero = lo = hi = jnp.zeros((1, ncol), jnp.float32)
        zero = zero.astype(jnp.int8)

    def run_block(b, i1, nb, state):
        """Processes rows ``i1 .. i1 + nb`` (``nb`` static, ``i1`` maybe traced)."""
        wp, q_all, c_all, m_all, scale, zero, lo, hi = state
        w1 = lax.dynamic_slice_in_dim(wp, i1, nb, 0)
        u1 = lax.dynamic_slice(u, (i1, i1), (nb, nb))
        d1 = lax.dynamic_slice_in_dim(diag_u, i1, nb)
        gidx1 = lax.dynamic_slice_in_dim(gidx, i1, nb)
        if sparsity is not None:
            score = w1**2 / (d1**2)[:, None]
            if axis_name is None:
                mask1 = keep_block(score, counts[b])
            else:
                mask1 = keep_block_sharded(score, counts[b], axis_name=axis_name, cols=cols,
                                           total_cols=total_cols)
        else:
            mask1 = jnp.ones((nb, ncol), bool)

        def body(i, c):
            w1, err1, q1, c1, mask1, sc, zp, lo_, hi_ = c
            if m is not None:
                def nm(mask1):
                    rows = lax.dynamic_slice_in_dim(w1, i, m, 0)
                    dg = lax.dynamic_slice_in_dim(d1, i, m)
                    keep = keep_top_per_column(rows**2 / (dg**2)[:, None], n,
                                                keep_first_ties=True)
                    return lax.dynamic_update_slice_in_dim(mask1, keep, i, 0)
                mask1 = lax.cond(i % m == 0, nm, lambda x: x, mask1)
            row = w1[i]
            keep = mask1[i]
            if quant:
                if dynamic:
                    def grp(p):
                        new = _group_params(lax.dynamic_slice_in_dim(w1, i, g, 0), bits,
                                            symmetric, clip_search)
                        gi = (i1 + i) // g
                        return tuple(a.at[gi].set(v) for a, v in zip(p, new))
                    sc, zp, lo_, hi_ = lax.cond(i % g == 0, grp, lambda p: p,
                                                (sc, zp, lo_, hi_))
                gi = gidx1[i]
                codes, q = _quantize_row(row, sc[gi], zp[gi], lo_[gi], hi_[gi], bits,
                                         symmetric)
                codes = jnp.where(keep, codes, zp[gi])
            else:
                codes = jnp.zeros((ncol,), jnp.int8)
                q = row
            q = jnp.where(keep, q, 0.0)
            err = (row - q) / d1[i]
            w1 = w1 - u1[i][:, None] * err[None, :]
            return (w1, err1.at[i].set(err), q1.at[i].set(q), c1.at[i].set(codes), mask1,
                    sc, zp, lo_, hi_)

        zeros = jnp.zeros((nb, ncol), jnp.float32)
        c = lax.fori_loop(0, nb, body, (w1, zeros, zeros, jnp.zeros((nb, ncol), jnp.int8),
                                         mask1, scale, zero, lo, hi))
        _, err1, q1, c1, mask1, scale, zero, lo, hi = c
        q_all = lax.dynamic_update_slice_in_dim(q_all, q1, i1, 0)
        c_all = lax.dynamic_update_slice_in_dim(c_all, c1, i1, 0)
        m_all = lax.dynamic_update_slice_in_dim(m_all, mask1, i1, 0)
        # Lazy update of every later row by the whole block's errors. U is upper
        # triangular, so rows before the block get nothing; the block's own rows are
        # masked out (they were updated row by row), which keeps one static shape.
        upd = jnp.matmul(lax.dynamic_slice_in_dim(u, i1, nb, 0).T, err1,
                         precision=lax.Precision.HIGHEST)
        later = (jnp.arange(k) >= i1 + nb)[:, None]
        wp = wp - jnp.where(later, upd, 0.0)
        return wp, q_all, c_all, m_all, scale, zero, lo, hi

    state = (wp, jnp.zeros((k, ncol), jnp.float32), jnp.zeros((k, ncol), jnp.int8),
             jnp.ones((k, ncol), bool), scale, zero, lo, hi)
    # One compiled block body for all full blocks (compile time does not grow with K).
    if n_full == 1:
        state = run_block(0, 0, big_b, state)
    elif n_full > 1:
        state = lax.fori_loop(0, n_full, lambda b, st: run_block(b, b * big_b, big_b, st),
                              state)
    if tail:
        state = run_block(n_full, n_full * big_b, tail, state)
    _, q_all, c_all, m_all, scale, zero, lo, hi = state
    inv = jnp.argsort(perm)
    weights = jnp.ldexp(q_all[inv], shift)
    mask = m_all[inv]
    factor_ok = jnp.isfinite(u).all()
    if not quant:
        return SweepResult(weights, None, None, None, mask, factor_ok)
    codes = c_all[inv]
    scale = jnp.ldexp(scale, shift)
    return SweepResult(weights, codes, scale, None if symmetric else zero, mask, factor_ok)


# Weights at or above this magnitude are swept divided by a power of two (see `_normalize`).
# Below it, the squared scores (``w^2 / U_kk^2``) and the compensated rows stay far from
# float32's limit, and ordinary weights are swept bit for bit as given.
NORMALIZE_ABOVE = 2.0**32


def _normalize(w: jax.Array, damp: float, axis_name: str | tuple[str, ...] | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """``(w * 2^-shift, shift)``: weights with ``max |w| >= NORMALIZE_ABOVE`` scaled to
    ``[0.5, 1)``, else unchanged (``shift = 0``).

    Error compensation adds ``U[i, j] / U[i, i]`` times row ``i``'s error to row ``j``: with
    weights near float32's limit that overflowed to Inf and then NaN (reported as a Hessian
    that is not positive definite) even where the result fits, and their scores ``w^2``
    were Inf already above ``2^64``, so the mask ranked them by position. The sweep is
    homogeneous in ``W`` (the mask compares ratios; the quantizer's scale follows the range),
    and a power of two scales exactly, so the result is the same up to values below ``2^-126``
    of the largest weight, which flush to zero. ``damp = inf`` propagates nothing: no shift,
    so it stays exactly round-to-nearest / magnitude pruning.
    """
    if damp == math.inf:
        return w, jnp.zeros((), jnp.int32)
    amax = jnp.max(jnp.abs(w))
    if axis_name is not None:  # one shift for the whole kernel, as on one device
        amax = lax.pmax(amax, axis_name)
    _, exp = jnp.frexp(amax)
    shift = jnp.where(jnp.isfinite(amax) & (amax >= NORMALIZE_ABOVE), exp, 0).astype(jnp.int32)
    return jnp.ldexp(w, -shift), shift


def check_matrix(name: str, w, h) -> tuple[int, int]:
    """Shape checks shared by the matrix functions; returns ``(K, N)``."""
    if np.ndim(w) != 2:
        raise ValueError(f"{name}: expected a (K, N) weight matrix, got shape {np.shape(w)}")
    k, ncol = np.shape(w)
    if h is None:
        raise ValueError(f"{name}: no calibration statistics (Hessian) for this layer")
    if np.shape(h) != (k, k):
        raise ValueError(f"{name}: Hessian of shape {np.shape(h)} does not match K={k}")
    if k == 0 or ncol == 0:
        raise ValueError(f"{name}: empty weight matrix of shape {(k, ncol)}")
    return k, ncol


def check_quant(name: str, k: int, bits: int, group_size: int | None) -> None:
    if bits not in INT_BITS:
        raise ValueError(f"{name}: bits must be one of {INT_BITS}, got {bits!r}")
    if group_size is not None and (int(group_size) < 1 or k % int(group_size)):
        raise ValueError(f"{name}: group_size={group_size} does not divide K={k}")


def check_damp(name: str, damp: float) -> None:
    if not (isinstance(damp, (int, float)) and damp >= 0) or math.isnan(damp):
        raise ValueError(f"{name}: damp must be a number >= 0 (inf allowed), got {damp!r}")


def check_weights_finite(name: str, w) -> None:
    """Concrete-only NaN/Inf check of the weights (skipped under tracing)."""
    if isinstance(w, jax.core.Tracer):
        return
    if not bool(np.isfinite(np.asarray(w, np.float64)).all()):
        raise ValueError(f"{name}: the weights hold NaN or Inf")


def check_result(name: str, res: SweepResult, damp: float) -> None:
    """Concrete-only check of a sweep's weights; names the actual fault.

    Non-finite output of finite input comes from one of two causes, told apart here: the
    damped Hessian's Cholesky factor failed (not positive definite), or the compensated
    weights exceed float32's range -- the result itself is not representable.
    """
    if isinstance(res.weights, jax.core.Tracer) or bool(jnp.isfinite(res.weights).all()):
        return
    if res.factor_ok is not None and not bool(res.factor_ok):
        raise ValueError(f"{name}: the damped Hessian is not positive definite; "
                         f"raise damp (now {damp})")
    raise ValueError(f"{name}: the error-compensated weights overflow float32 (the result is "
                     "not representable); scale the layer's weights down")


def check_finite(name: str, h) -> None:
    """Concrete-only NaN/Inf check of a Hessian (skipped under tracing)."""
    if isinstance(h, jax.core.Tracer):
        return
    if not bool(np.isfinite(np.asarray(h)).all()):
        raise ValueError(f"{name}: the Hessian X^T X holds NaN or Inf")
