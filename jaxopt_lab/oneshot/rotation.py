"""Random Hadamard rotations of a residual stream (QuaRot / SpinQuant style).

In a pre-RMSNorm transformer (LLaMA), every kernel that reads the residual stream does so
through ``RMSNorm(h) = h / rms(h) * g``; with ``g`` folded into those kernels' rows,
``rms(h Q) = rms(h)`` for an orthogonal ``Q``, so rotating the stream -- embeddings
``E Q``, readers ``Q^T W``, writers ``W Q`` -- leaves the float model's output unchanged
while spreading outlier channels over all channels (easier to quantize).

Where it is exact: residual streams normalized by RMSNorm (no mean subtraction) before
every reader. A LayerNorm's mean subtraction commutes with ``Q`` only if ``Q`` maps the
all-ones vector to itself; and a post-LN BERT normalizes *after* the residual addition
and carries the normalized value on, so it is not rotation invariant: do not use these on
paraphrase-MiniLM or other post-LN encoders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.oneshot.stats import check_size


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_hadamard(key: jax.Array, n: int) -> jax.Array:
    """A random orthogonal ``(n, n)`` matrix: ``diag(signs) (H_{2^k} (x) Q_m) / sqrt(2^k)``.

    ``n = 2^k m`` with ``m`` odd; ``H`` is the Sylvester Hadamard matrix and ``Q_m`` a
    random orthogonal ``m x m`` matrix (1 when ``n`` is a power of two).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> q = random_hadamard(jax.random.key(0), 12)
      >>> bool(jnp.allclose(q @ q.T, jnp.eye(12), atol=1e-5))
      True
    """
    n = check_size("random_hadamard", "n", n)
    p2 = n & -n
    m = n // p2
    k1, k2 = jax.random.split(key)
    h = jnp.asarray(_sylvester(p2) / np.sqrt(p2), jnp.float32)
    if m > 1:
        q_m, r = jnp.linalg.qr(jax.random.normal(k2, (m, m)))
        q_m = q_m * jnp.sign(jnp.diag(r))[None]
        h = jnp.kron(h, q_m)
    signs = jnp.where(jax.random.bernoulli(k1, 0.5, (n,)), 1.0, -1.0)
    return signs[:, None] * h


def _check_q(fn: str, q) -> int:
    if np.ndim(q) != 2 or np.shape(q)[0] != np.shape(q)[1]:
        raise ValueError(f"{fn}: Q must be a square (K, K) matrix, got shape {np.shape(q)}")
    return np.shape(q)[0]


def _check_vector(fn: str, arg: str, v) -> int:
    if np.ndim(v) != 1:
        raise ValueError(f"{fn}: {arg} must be a (K,) vector, got shape {np.shape(v)}")
    return np.shape(v)[0]


def _check_kernels(fn: str, arg: str, kernels, k: int, *, axis: int) -> None:
    """Each kernel must be 2-D with ``k`` along ``axis``; the error names it as
    ``arg[i]`` (a matmul's own error names no kernel)."""
    for i, w in enumerate(kernels):
        if np.ndim(w) != 2 or np.shape(w)[axis] != k:
            side = "rows" if axis == 0 else "columns"
            raise ValueError(f"{fn}: {arg}[{i}] of shape {np.shape(w)} must be 2-D with "
                             f"{k} {side} (K={k})")


def fold_norm_scale(scale: jax.Array, readers: list[jax.Array]) -> tuple[jax.Array,
                                                                           list[jax.Array]]:
    """Moves an RMSNorm's ``scale`` into the rows of the ``(K, N)`` kernels reading it.

    Returns ``(ones, new kernels)``.
    """
    k = _check_vector("fold_norm_scale", "scale", scale)
    _check_kernels("fold_norm_scale", "readers", readers, k, axis=0)
    return jnp.ones_like(scale), [w * scale[:, None] for w in readers]


def rotate_readers(readers: list[jax.Array], q: jax.Array) -> list[jax.Array]:
    """Kernels ``(K, N)`` reading the rotated stream: ``Q^T W``."""
    k = _check_q("rotate_readers", q)
    _check_kernels("rotate_readers", "readers", readers, k, axis=0)
    return [jnp.matmul(q.T, w, precision=jax.lax.Precision.HIGHEST) for w in readers]


def rotate_writers(writers: list[jax.Array], q: jax.Array) -> list[jax.Array]:
    """Kernels ``(K, N)`` writing to the stream (and embeddings ``(V, N)``): ``W Q``."""
    k = _check_q("rotate_writers", q)
    _check_kernels("rotate_writers", "writers", writers, k, axis=1)
    return [jnp.matmul(w, q, precision=jax.lax.Precision.HIGHEST) for w in writers]
