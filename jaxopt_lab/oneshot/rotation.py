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
    if int(n) < 1:
        raise ValueError(f"random_hadamard: n must be >= 1, got {n}")
    n = int(n)
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


def fold_norm_scale(scale: jax.Array, readers: list[jax.Array]) -> tuple[jax.Array,
                                                                           list[jax.Array]]:
    """Moves an RMSNorm's ``scale`` into the rows of the ``(K, N)`` kernels reading it.

    Returns ``(ones, new kernels)``.
    """
    return jnp.ones_like(scale), [w * scale[:, None] for w in readers]


def rotate_readers(readers: list[jax.Array], q: jax.Array) -> list[jax.Array]:
    """Kernels ``(K, N)`` reading the rotated stream: ``Q^T W``."""
    return [jnp.matmul(q.T, w, precision=jax.lax.Precision.HIGHEST) for w in readers]


def rotate_writers(writers: list[jax.Array], q: jax.Array) -> list[jax.Array]:
    """Kernels ``(K, N)`` writing to the stream (and embeddings ``(V, N)``): ``W Q``."""
    return [jnp.matmul(w, q, precision=jax.lax.Precision.HIGHEST) for w in writers]
