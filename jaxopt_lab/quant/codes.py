"""Integer and fp8 codes of a grouped view from each slice's range.

The numerics shared by `jaxopt_lab.quant.core` (one jitted program per leaf) and
`jaxopt_lab.quant.eager` (one elementwise program for many small leaves), so both give
the same codes bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab.quant.affine import (
    exact_div,
    safe_scale,
    affine_codes,
    affine_params,
    divide,
    integer_range,
    round_half_away,
)


def grouped(x: jax.Array, s: Mapping[str, Any]) -> tuple[jax.Array, tuple[int, ...]]:
    """View of ``x`` in which one scale covers the ``reduce`` axes (kept as size-1 dims)."""
    if s["granularity"] == "tensor":
        return x, tuple(range(x.ndim))
    if s["granularity"] == "channel":
        return x, tuple(i for i in range(x.ndim) if i not in s["axis"])
    g0, g1, g = s["group_axis"][0], s["group_axis"][-1] + 1, s["group_size"]
    n = int(np.prod(x.shape[g0:g1]))
    view = x.reshape(x.shape[:g0] + (n // g, g) + x.shape[g1:])
    return view, (g0 + 1,)


def _round_scale_up(scale: jax.Array, dtype: Any) -> jax.Array:
    """The smallest bfloat16 >= the positive float32 ``scale`` (as float32), so nothing new
    clips.

    By bits (bfloat16 is float32 without its low 16 bits), not by comparing a rounded copy
    with ``scale``: XLA may keep excess precision in the copy (it does on GPU), which made
    that comparison always false and the scale round to nearest.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return scale
    assert jnp.dtype(dtype) == jnp.bfloat16, dtype  # SCALE_DTYPES
    bits = lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
    up = lax.bitcast_convert_type((bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000), jnp.float32)
    return jnp.minimum(up, float(jnp.finfo(jnp.bfloat16).max))


def compute_codes(view: jax.Array, red: tuple[int, ...], s: Mapping[str, Any]):
    """Codes of the grouped ``view`` with keepdims scale and zero point (``None``)."""
    lo = jnp.min(view, axis=red, keepdims=True)
    hi = jnp.max(view, axis=red, keepdims=True)
    return codes_from_range(view, lo, hi, s)


def codes_from_range(view: jax.Array, lo: jax.Array, hi: jax.Array, s: Mapping[str, Any]):
    """`compute_codes` given each slice's ``lo``/``hi`` (broadcast against ``view``).

    Elementwise in ``view``, ``lo`` and ``hi``: `jaxopt_lab.quant.eager` runs it on
    flattened leaves with ``lo``/``hi`` repeated per element, one program for any shapes.
    """
    if s["dtype"] is not None:
        fmax = float(jnp.finfo(s["dtype"]).max)
        # max|x| over a slice is max(|min|, |max|) exactly (NaN and inf included).
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = _round_scale_up(safe_scale(exact_div(amax, fmax), amax), s["scale_dtype"])
        return jnp.clip(divide(view, scale), -fmax, fmax).astype(s["dtype"]), scale, None
    bits, sym = s["bits"], s["symmetric"]
    scale, zero = affine_params(lo, hi, bits=bits, symmetric=sym)
    exact_scale = jnp.dtype(s["scale_dtype"]) == jnp.float32
    if not exact_scale:
        scale = _round_scale_up(scale, s["scale_dtype"])
        if not sym:
            qmin, qmax = integer_range(bits, False)
            zero = jnp.clip(round_half_away(qmin - divide(jnp.minimum(lo, 0.0), scale)),
                            qmin, qmax)
            zero = zero.astype(jnp.int8)
    codes = affine_codes(view, scale, zero, bits=bits, symmetric=sym)
    if not sym and exact_scale:
        codes = pin_range_ends(view, codes, scale, zero, lo, hi, bits=bits)
    return codes, scale, zero


def pin_range_ends(view: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array,
                   lo: jax.Array, hi: jax.Array, *, bits: int) -> jax.Array:
    """Asymmetric ``codes`` with the range ends ``lo``/``hi`` pinned to qmin/qmax.

    Float noise in near-ties can leave a range end one code short of qmin/qmax; pinning it
    (error still <= s/2 + rounding) makes dequantized values reproduce the same (s, z).
    Shared with the GPTQ sweep (`jaxopt_lab.oneshot`), whose round-to-nearest must equal
    `jaxopt_lab.quantize` code for code.
    """
    qmin, qmax = integer_range(bits, False)
    # Only a near-tie is pinned (the end's level within float noise of half a code from
    # qmin/qmax): a scale clamped up from an underflow (ranges near 1e-38) leaves the
    # range ends well inside [qmin, qmax], and there they stay.
    level = divide(view, scale) + zero.astype(jnp.float32)
    codes = jnp.where((view == hi) & (hi > 0) & (level >= qmax - 0.5 - 1e-3),
                      jnp.int8(qmax), codes)
    return jnp.where((view == lo) & (lo < 0) & (level <= qmin + 0.5 + 1e-3),
                     jnp.int8(qmin), codes)
