"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before rounding.

Input channels that carry large activations matter more; scaling their weight rows up by
``s_k`` before round-to-nearest (and the input down by ``s_k``) protects them. AWQ searches
``s = mean|X_k|^a`` (normalized so ``sqrt(max s * min s) = 1``) over a grid of ``a`` in
``[0, 1)`` and keeps the one with the smallest output error ``||X W - (X / s) Q(s W)||``,
computed exactly from ``H = X^T X``. ``a = 0`` is plain round-to-nearest, so the chosen
scales are never worse than it on the calibration inputs. All grid points are evaluated in
one compiled program (``vmap``).

The returned ``s`` must divide the kernel's input: fold it into the op before where that
op feeds only this kernel through linear maps (`fold_scale_into_norm` for a pre-LN norm,
`fold_scale_into_dense` for a previous Dense's output columns), otherwise keep it explicit
(``x / s`` before the matmul). `awq_matrix` also returns the
effective weights ``Q(s W) / s`` that both forms compute.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _obs
from jaxopt_lab.quant.core import leaf_settings, quantize_array
from jaxopt_lab.quant.settings import QuantSettings
from jaxopt_lab.quant.qtensor import QTensor


class AWQResult(NamedTuple):
    """``qtensor``: ``Q(diag(s) W)``; ``scales``: ``s`` (``(K,)``); ``alpha``: the chosen
    exponent; ``effective``: ``Q(s W) / s`` as float ``(K, N)``."""

    qtensor: QTensor
    scales: jax.Array
    alpha: jax.Array
    effective: jax.Array


def _settings(w, bits, group_size, symmetric, name: str) -> tuple:
    """`jaxopt_lab.quantize`'s resolved settings for a ``(K, N)`` kernel, as a static tuple."""
    base = _select.settings(name, QuantSettings, bits=bits, group_size=group_size,
                            granularity="channel" if group_size is None else "group",
                            symmetric=symmetric)
    return tuple(sorted(leaf_settings(name, w, base, True).items()))


@functools.partial(jax.jit, static_argnames=("settings", "n_grid"))
def _search(w, h, act_mean, *, settings, n_grid):
    s_set = dict(settings)
    mean = jnp.maximum(act_mean, 1e-8)
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def scales(a):
        s = mean ** a
        return s / jnp.sqrt(s.max() * s.min())

    def loss(a):
        s = scales(a)
        eff = quantize_array(w * s[:, None], **s_set).dequantize(jnp.float32) / s[:, None]
        d = w - eff
        return jnp.sum(d * jnp.matmul(h, d, precision=jax.lax.Precision.HIGHEST))

    # A non-finite loss counts as the worst: argmin would pick a NaN (or an overflowed
    # -inf), and those come from weights near float32's max whose scaled copy overflowed
    # (an all-NaN QTensor). With every loss non-finite, argmin's first index is a = 0,
    # plain round-to-nearest. Finite losses (every normal-range input) are untouched.
    losses = jax.vmap(loss)(alphas)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    best = alphas[jnp.argmin(losses)]
    s = jnp.where(best == 0, 1.0, scales(best))  # a = 0 is exactly round-to-nearest
    qt = quantize_array(w * s[:, None], **s_set)
    return qt, s, best, qt.dequantize(jnp.float32) / s[:, None]


def awq_matrix(
    w: jax.typing.ArrayLike,
    h: jax.typing.ArrayLike,
    act_mean: jax.typing.ArrayLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    n_grid: int = 20,
    name: str = "weight",
) -> AWQResult:
    """AWQ scale search for one ``(K, N)`` kernel.

    Args:
      w: float weights, Flax layout.
      h: ``X^T X`` of the calibration inputs (the error is measured with it).
      act_mean: ``mean |X_k|`` per input channel (``abs_sum / count`` of `LayerStats`).
      bits, group_size, symmetric: the round-to-nearest quantizer (`jaxopt_lab.quantize`).
      n_grid: exponents ``0, 1/n_grid, ..., (n_grid - 1)/n_grid`` are tried.
      name: what error messages call the layer.

    Returns:
      An `AWQResult`.

    Raises:
      ValueError: naming ``name``, for bad shapes, bits, a group size that does not divide
        ``K``, or non-finite statistics.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import awq_matrix
      >>> x = jax.random.normal(jax.random.key(0), (64, 8)) * jnp.arange(1.0, 9.0)[None]
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> r = awq_matrix(w, x.T @ x, jnp.abs(x).mean(0), bits=3)
      >>> err = lambda v: float(jnp.linalg.norm(x @ (w - v)))
      >>> err(r.effective) <= err(jol.dequantize(jol.quantize(w, bits=3)))
      True
    """
    k, _ = _obs.check_matrix(name, w, h)
    _obs.check_quant(name, k, bits, group_size)
    if jnp.shape(act_mean) != (k,):
        raise ValueError(f"{name}: activation means of shape {jnp.shape(act_mean)} do not "
                         f"match K={k}")
    _obs.check_finite(name, h)
    if not bool(jnp.isfinite(jnp.asarray(act_mean)).all()):
        raise ValueError(f"{name}: activation means hold NaN or Inf")
    if int(n_grid) < 1:
        raise ValueError(f"{name}: n_grid must be >= 1, got {n_grid}")
    return AWQResult(*_search(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                              jnp.asarray(act_mean, jnp.float32),
                              settings=_settings(jnp.asarray(w, jnp.float32), int(bits),
                                                 group_size, bool(symmetric), name),
                              n_grid=int(n_grid)))


def _check_scale(name: str, s, k: int) -> jax.Array:
    s = jnp.asarray(s, jnp.float32)
    if s.shape != (k,):
        raise ValueError(f"{name}: scales of shape {s.shape} do not match the {k} channels")
    if not isinstance(s, jax.core.Tracer) and not bool(((s > 0) & jnp.isfinite(s)).all()):
        raise ValueError(f"{name}: scales must be positive and finite")
    return s


def fold_scale_into_dense(params: dict, s: jax.typing.ArrayLike, *, name: str = "dense"
                          ) -> dict:
    """Divides a previous Dense's output columns (``kernel[..., j]`` and ``bias[j]``) by
    ``s``: its output becomes ``y / s``, the input AWQ's ``Q(s W)`` expects.

    Exact only where that output reaches the quantized kernel through linear maps alone
    (e.g. the value projection before an attention-output kernel: the context is a convex
    mix of value rows, per channel) and feeds nothing else.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = fold_scale_into_dense({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      ...                           jnp.array([2.0, 4.0]))
      >>> p["kernel"][0].tolist(), p["bias"].tolist()
      ([0.5, 0.25], [0.5, 0.25])
    """
    k = params["kernel"]
    s = _check_scale(name, s, k.shape[-1])
    out = dict(params)
    out["kernel"] = k / s.reshape((1,) * (k.ndim - 1) + (-1,))
    if "bias" in params:
        out["bias"] = params["bias"] / s
    return out


def fold_scale_into_norm(params: dict, s: jax.typing.ArrayLike, *, name: str = "norm"
                         ) -> dict:
    """Divides a norm's ``scale`` and ``bias`` by ``s`` (pre-LN blocks, where the norm's
    output feeds only the quantized kernels).

    Examples:
      >>> import jax.numpy as jnp
      >>> fold_scale_into_norm({"scale": jnp.ones(2)}, jnp.array([2.0, 1.0]))["scale"].tolist()
      [0.5, 1.0]
    """
    s = _check_scale(name, s, params["scale"].shape[-1])
    out = dict(params)
    out["scale"] = params["scale"] / s
    if "bias" in params:
        out["bias"] = params["bias"] / s
    return out
