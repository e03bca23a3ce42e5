"""Exact rescaling by powers of two, for reductions that must not overflow or underflow."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pow2_scale(top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(2**-k, 2**k)`` with ``top * 2**-k`` near 1 (at most ``2**28``), both factors far
    inside the normal range (``2**+-100`` in float32); elementwise over ``top``.

    Scaling by a power of two is exact, and keeping the factors normal with a margin
    matters: XLA turns ``x / top`` into ``x * (1 / top)``, and may fold ``0.5 * 2**-k``,
    flushing any subnormal factor to 0.
    """
    info = jnp.finfo(top.dtype)
    _, k = jnp.frexp(top)
    k = jnp.clip(k, int(info.minexp) + 26, int(info.maxexp) - 28)
    one = jnp.ones((), top.dtype)
    return jnp.ldexp(one, -k), jnp.ldexp(one, k)
