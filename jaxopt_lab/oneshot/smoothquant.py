"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

For a kernel ``W`` (``(K, N)``) fed by activations ``X`` with per-channel maxima
``max|X_k|``, ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)``; then
``X W = (X / s) (s W)``: the input is divided by ``s`` -- folded into whatever produced it
(a LayerNorm's scale and bias, or the previous Dense's output columns) -- and the kernel's
rows are multiplied by ``s``. Float outputs are unchanged; int8 activations see a flatter
range. Kernels sharing one input (Q, K and V) must share ``s``: pass all their rows'
maxima together (``weight_absmax`` the elementwise maximum over them).

Where the fold is exact: a pre-LN block (LLaMA, pre-LN BERT/GPT), whose norm output feeds
only the Q/K/V or up/gate kernels. In a post-LN BERT the norm output also carries the
residual stream, so folding into it changes the model; there only the attention-output
kernel folds exactly (into the value projection's output columns, since the attention
context is linear in V), and other kernels need the scale kept explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def smooth_scales(act_absmax: jax.typing.ArrayLike, weight_absmax: jax.typing.ArrayLike, *,
                  alpha: float = 0.5, name: str = "layer") -> jax.Array:
    """Per-input-channel smoothing factors ``s`` (shape ``(K,)``, positive and finite).

    Args:
      act_absmax: ``max |X_k|`` over the calibration rows (`LayerStats.abs_max`).
      weight_absmax: ``max_j |W[k, j]|`` per input channel (over every kernel reading X).
      alpha: migration strength in ``[0, 1]`` (0: nothing moves; 1: all into the weights).
      name: what error messages call the layer.

    Returns:
      ``s``; channels with a zero activation or weight maximum get ``s = 1``.

    Raises:
      ValueError: naming ``name``, for alpha outside ``[0, 1]``, mismatched shapes, or
        non-finite maxima.

    Examples:
      >>> import jax.numpy as jnp
      >>> smooth_scales(jnp.array([16.0, 1.0]), jnp.array([1.0, 1.0]), alpha=0.5).tolist()
      [4.0, 1.0]
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha!r}")
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.asarray(weight_absmax, jnp.float32)
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(f"{name}: activation maxima {a.shape} and weight maxima {w.shape} "
                         "must be the same (K,) shape")
    if not isinstance(a, jax.core.Tracer) and not bool(
            np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(w)).all()):
        raise ValueError(f"{name}: activation or weight maxima hold NaN or Inf")
    ok = (a > 0) & (w > 0)
    s = jnp.where(ok, jnp.where(ok, a, 1.0) ** alpha / jnp.where(ok, w, 1.0) ** (1 - alpha),
                  1.0)
    return jnp.clip(s, 1e-5, 1e5)  # keeps the folded scales in float32's comfortable range


def smooth_layernorm(ln_params: dict, kernels: list[jax.Array], s: jax.Array
                     ) -> tuple[dict, list[jax.Array]]:
    """Folds ``1 / s`` into a LayerNorm (``scale``, ``bias``) and ``s`` into the rows of the
    ``(K, N)`` kernels that read its output: the float model computes the same function.

    Examples:
      >>> import jax.numpy as jnp
      >>> ln = {"scale": jnp.ones(2), "bias": jnp.zeros(2)}
      >>> ln2, (w2,) = smooth_layernorm(ln, [jnp.ones((2, 3))], jnp.array([2.0, 1.0]))
      >>> ln2["scale"].tolist(), w2[:, 0].tolist()
      ([0.5, 1.0], [2.0, 1.0])
    """
    k = np.shape(ln_params["scale"])
    if np.shape(s) != k or len(k) != 1:
        raise ValueError(f"smooth_layernorm: s of shape {np.shape(s)} does not match the "
                         f"norm's scale {k}")
    for i, w in enumerate(kernels):
        if np.ndim(w) != 2 or np.shape(w)[0] != k[0]:
            raise ValueError(f"smooth_layernorm: kernels[{i}] of shape {np.shape(w)} must be "
                             f"2-D with {k[0]} rows (the norm's K)")
    out = dict(ln_params)
    out["scale"] = ln_params["scale"] / s
    if "bias" in ln_params:
        out["bias"] = ln_params["bias"] / s
    return out, [k * s[:, None] for k in kernels]
