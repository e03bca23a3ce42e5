"""Weight-only quantized matmul: float activations times a 2-D `QTensor` weight.

`weight_only_matmul` is ``x @ dequantize(qt)`` without the dequantized weight: on a CPU
with AVX-512 a native kernel reads the int8 or packed int4 codes directly (a GEMV at batch
1 that streams each code once, a panel-by-panel dequantizing GEMM above; see
`jaxopt_lab.quant.native`). Every other layout, platform or setting runs XLA's dot on
``dequantize(qt)``.

Examples:
  >>> import jax.numpy as jnp, jaxopt_lab as jol
  >>> from jaxopt_lab.quant.weight_only import weight_only_matmul
  >>> w = jnp.arange(12.0).reshape(3, 4) - 6
  >>> qt = jol.quantize(w, bits=4)  # one scale per output column
  >>> x = jnp.ones((1, 3))
  >>> bool(jnp.allclose(weight_only_matmul(x, qt), x @ jol.dequantize(qt), rtol=1e-6))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.quant import native
from jaxopt_lab.quant.qtensor import QTensor, packed_length


def _single_axis(axis) -> int | None:
    """A QTensor axis field as one int: an int, or a 1-tuple of ints; else ``None``."""
    if isinstance(axis, (tuple, list)):
        return int(axis[0]) if len(axis) == 1 else None
    return None if axis is None else int(axis)


def _as_rows(qt: QTensor) -> tuple[jax.Array, jax.Array | None] | None:
    """Scale (and zero point) as ``(G, N)`` rows whose groups run along K, or ``None`` when
    the kernel does not take this layout."""
    k, n = qt.shape
    scale, zp = jnp.asarray(qt.scale), qt.zero_point
    if qt.granularity == "tensor" and scale.size == 1:
        rows = (1, 1)
    elif qt.granularity == "channel" and _single_axis(qt.axis) in (1, -1) \
            and scale.shape == (n,):
        rows = (1, n)
    elif (qt.granularity == "group" and _single_axis(qt.group_axis) in (0, -2)
          and qt.group_size and k % qt.group_size == 0
          and scale.shape == (k // qt.group_size, n)):
        rows = scale.shape
    else:
        return None
    if zp is not None and (jnp.dtype(zp.dtype) != jnp.int8 or zp.size != scale.size):
        return None
    full = (rows[0], n)
    scale = jnp.broadcast_to(scale.astype(jnp.float32).reshape(rows), full)
    if zp is not None:
        zp = jnp.broadcast_to(jnp.asarray(zp).reshape(rows), full)
    return scale, zp


def _check(x: jax.Array, qt: QTensor) -> None:
    if not isinstance(qt, QTensor):
        raise ValueError(f"qt must be a QTensor, got {type(qt).__name__}")
    if qt.ndim != 2 or jnp.ndim(qt.qvalue) != 2:
        raise ValueError(f"qt must be one 2-D (K, N) QTensor, got shape {qt.shape} with "
                         f"storage {jnp.shape(qt.qvalue)}")
    if x.ndim != 2 or x.shape[1] != qt.shape[0] or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float (M, K) array with K = {qt.shape[0]}, got "
                         f"{x.dtype}{x.shape}")


def weight_only_matmul(x: jax.typing.ArrayLike, qt: QTensor, *, precision=None) -> jax.Array:
    """``x @ dequantize(qt)`` for float ``(M, K)`` activations and a ``(K, N)`` `QTensor`.

    The weights are ``qt.dequantize(jnp.float32)``; the product is accumulated in float32
    and rounded once to ``x``'s dtype. On CPU with the native kernels (int8 or 4-bit
    codes; per-tensor, per-output-channel or K-grouped scales; with or without zero point)
    it equals XLA's float32 dot on those weights up to summation order; elsewhere it is
    that dot.

    Args:
      x: float32 or bfloat16 ``(M, K)`` activations (``M`` may be 1).
      qt: a 2-D `QTensor` of shape ``(K, N)`` (no stacked batch axes).
      precision: passed to XLA's dot where XLA computes the product.

    Returns:
      ``(M, N)`` in ``x``'s dtype.

    Raises:
      ValueError: ``qt`` is not a 2-D `QTensor` or ``x`` is not a float ``(M, K)`` array.
    """
    x = jnp.asarray(x)
    _check(x, qt)
    k, n = qt.shape

    def xla(*_):
        w = qt.dequantize(jnp.float32)
        return lax.dot(x.astype(jnp.float32), w, precision=precision,
                       preferred_element_type=jnp.float32)

    rows = _as_rows(qt) if qt.fp8 is None and qt.bits in (4, 8) else None
    storage = jnp.int8 if qt.bits == 8 else jnp.uint8
    if (rows is None or jnp.dtype(qt.qvalue.dtype) != storage
            or jnp.shape(qt.qvalue) != (k, packed_length(n, qt.bits))):
        return xla().astype(x.dtype)
    scale, zp = rows
    y = native.weight_only_matmul_codes(x.astype(jnp.float32), jnp.asarray(qt.qvalue), scale,
                                        zp, bits=qt.bits, fallback=xla)
    return y.astype(x.dtype)
