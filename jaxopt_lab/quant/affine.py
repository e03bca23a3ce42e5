"""Affine integer quantization numerics shared by quantize, fake_quant and int8 compute.

``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s`` with signed codes:
symmetric codes use the restricted range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` and ``z = 0``;
asymmetric codes use ``[-2**(b-1), 2**(b-1) - 1]`` and an ``int8`` zero point chosen so that
0.0 is exactly representable. ``round`` is `round_half_away` (ties away from zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TINY = float(np.finfo(np.float32).tiny)


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the signed codes: restricted when symmetric, full otherwise."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def exact_div(num: jax.Array, den: float) -> jax.Array:
    # XLA rewrites division by a constant as a multiply by its rounded reciprocal; hiding the
    # constant keeps the division correctly rounded, so re-quantizing reproduces the scale.
    # The denominator is built from ``num`` so that vmap batches it too: XLA also rewrites
    # division by a broadcast. (0 * inf = NaN only where ``num`` is already non-finite.)
    return num / jax.lax.optimization_barrier(num * 0.0 + jnp.float32(den))


def divide(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike) -> jax.Array:
    """``x / scale`` correctly rounded, ``scale`` broadcast against ``x``.

    XLA rewrites a division by a broadcast as a multiply by the broadcast reciprocal: off by
    an ulp now and then, and for ``scale >= 2**126`` the reciprocal is subnormal and flushed
    to 0, so every code would be 0. Broadcasting ``scale`` behind a barrier keeps a true
    division, correct over the whole finite float32 range.
    """
    x, scale = jnp.asarray(x), jnp.asarray(scale)
    shape = jnp.broadcast_shapes(x.shape, scale.shape)
    return jnp.broadcast_to(x, shape) / jax.lax.optimization_barrier(
        jnp.broadcast_to(scale, shape))


def clamp_cast(x: jax.Array, dtype) -> jax.Array:
    """``x`` cast to ``dtype``, finite values clamped into its finite range (NaN stays NaN).

    A reconstruction ``(q - z) * s`` may lie up to half a step beyond the largest finite
    value of the original dtype (or of float32); the nearest finite value is closer to the
    original (finite) input than that level, so the round-trip bound still holds.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return x.astype(dtype)
    top = min(float(jnp.finfo(dtype).max), float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -top, top).astype(dtype)


def round_half_away(v: jax.Array) -> jax.Array:
    """Rounds to nearest, ties away from zero.

    Unlike half-to-even, the extremes of an asymmetric range then always land on
    ``qmin`` and ``qmax`` (ties of ``lo / s`` and ``hi / s`` round outwards together), which
    makes quantize(dequantize(quantize(x))) reproduce the same codes and zero point.
    """
    t = jnp.trunc(v)
    return jnp.where(jnp.abs(v - t) == 0.5, t + jnp.sign(v), jnp.round(v))


def safe_scale(scale: jax.Array, span: jax.Array) -> jax.Array:
    # span == 0 -> 1.0; underflow -> tiny; NaN stays NaN (jnp.maximum propagates it).
    return jnp.where(span == 0, 1.0, jnp.maximum(scale, _TINY)).astype(jnp.float32)


def affine_params(
    lo: jax.typing.ArrayLike, hi: jax.typing.ArrayLike, *, bits: int, symmetric: bool = True
) -> tuple[jax.Array, jax.Array | None]:
    """Scale (float32) and zero point (``int8``, ``None`` if symmetric) covering ``[lo, hi]``.

    Args:
      lo: minimum of the values (any shape); ``hi``: maximum, same shape.
      bits: code width, 2..8.
      symmetric: zero point 0 and range ``[-max|x|, max|x|]``.

    Returns:
      ``(scale, zero_point)`` with the shape of ``lo``.

    Examples:
      >>> s, z = affine_params(-1.0, 3.0, bits=8, symmetric=False)
      >>> round(float(s), 6), int(z)
      (0.015686, -64)
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    qmin, qmax = integer_range(bits, symmetric)
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return safe_scale(exact_div(amax, qmax), amax), None
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    levels = float(qmax - qmin)
    span = hi - lo
    # Two divisions, not (hi - lo) / levels: hi - lo overflows for huge ranges. A tiny span
    # takes the one division: there hi / levels and lo / levels can be subnormal, which the
    # CPU flushes to zero, and the lost parts (up to the smallest normal each) would leave a
    # step too small for the range, which then clips. Below this bound the span is finite;
    # above it the flushed parts are under half an ulp of the scale.
    tiny_span = span < levels * _TINY * 2.0**24
    scale = jnp.where(tiny_span, exact_div(jnp.where(tiny_span, span, 0.0), levels),
                      exact_div(hi, levels) - exact_div(lo, levels))
    scale = safe_scale(scale, span)
    zero = jnp.clip(round_half_away(qmin - divide(lo, scale)), qmin, qmax)
    return scale, zero.astype(jnp.int8)


def affine_codes(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike | None,
    *,
    bits: int,
    symmetric: bool = True,
) -> jax.Array:
    """``clip(round(x / scale) + zero_point, qmin, qmax)`` as ``int8`` (scale broadcastable).

    ``round`` is `round_half_away`; NaN codes come out as an arbitrary int (the NaN then
    lives on in the scale computed from the same values).
    """
    qmin, qmax = integer_range(bits, symmetric)
    q = round_half_away(divide(jnp.asarray(x, jnp.float32), scale))
    if zero_point is not None:
        q = q + jnp.asarray(zero_point, jnp.float32)
    return jnp.clip(q, qmin, qmax).astype(jnp.int8)
