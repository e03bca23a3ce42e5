"""Data: user arrays checked and split into a :class:`Dataset`, and batching.

The bundled data sets (scikit-learn's digits, ``.npz`` files) load in
:mod:`jaxopt_lab.app.datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np


class Split(NamedTuple):
    """One split of a data set: inputs ``x`` (N, ...) float32, labels ``y`` (N,) int32."""

    x: np.ndarray
    y: np.ndarray


class Dataset(NamedTuple):
    """Train/validation/test splits plus the number of classes."""

    train: Split
    val: Split
    test: Split
    num_classes: int


def validate_arrays(x, y, *, num_classes: int | None = None, name: str = "data"):
    """Checks a classification data set and returns ``(x float32, y int32, num_classes)``.

    Raises:
      ValueError: empty arrays, mismatched lengths, wrong rank, non-integer or
        out-of-range labels, or non-finite inputs.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise ValueError(
            f"{name}: x must have rank >= 2 (examples, features...), got shape {x.shape}"
        )
    if y.ndim != 1:
        raise ValueError(f"{name}: y must have rank 1 (one label per example), got shape {y.shape}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"{name}: empty arrays (x {x.shape}, y {y.shape})")
    if len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x)} examples but y has {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name}: x must be real numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all() or not np.isfinite(x.astype(np.float32)).all():
        raise ValueError(f"{name}: x holds NaN or Inf values (or values beyond float32's range)")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name}: labels must be integers, got non-integer values in y")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
    inferred = int(y.max()) + 1
    if num_classes is None:
        num_classes = inferred
    elif inferred > num_classes:
        raise ValueError(
            f"{name}: label {inferred - 1} out of range for num_classes={num_classes}"
        )
    return x.astype(np.float32), y.astype(np.int32), int(num_classes)


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, ...]:
    """Index arrays for a deterministic stratified split with the given fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


def make_dataset(
    x,
    y,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    num_classes: int | None = None,
    normalize: bool = True,
    name: str = "data",
) -> Dataset:
    """Validates, splits (stratified, from ``seed``) and normalises user arrays.

    Normalisation uses the training split's mean and standard deviation only, computed in
    float64 so that any finite float32 inputs give finite normalised float32 outputs.

    Raises:
      ValueError: anything :func:`validate_arrays` rejects, fewer than 3 examples, or bad
        ``fractions``.
    """
    x, y, num_classes = validate_arrays(x, y, num_classes=num_classes, name=name)
    if len(y) < 3:
        raise ValueError(f"{name}: need at least 3 examples to split, got {len(y)}")
    tr, va, te = stratified_split(y, fractions, seed)
    if normalize:
        x = _normalized(x, x[tr].astype(np.float64))
    return Dataset(Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), num_classes)


def _normalized(x: np.ndarray, train_x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with the statistics of ``train_x``, in float64, as float32.

    In float64 the sums of float32 values cannot overflow; a result beyond float32's range
    (a huge value in the val/test splits against a tiny training std) is clipped to it.
    """
    mean = train_x.mean()
    std = train_x.std()
    out = (x.astype(np.float64) - mean) / (std if std > 0 else 1.0)
    top = float(np.finfo(np.float32).max)
    return np.clip(out, -top, top).astype(np.float32)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_shards: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)`` batches of one epoch, shuffled deterministically by ``(seed, epoch)``.

    With ``num_shards`` set, each batch is reshaped to ``(num_shards, batch/num_shards, ...)``
    for ``pmap``; ``batch_size`` must then be divisible by ``num_shards``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_shards is not None and batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by num_shards={num_shards}")
    n = len(split.y)
    order = (
        np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    )
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x, y = split.x[idx], split.y[idx]
        if num_shards is not None:
            if len(y) % num_shards:
                continue
            x = x.reshape(num_shards, -1, *x.shape[1:])
            y = y.reshape(num_shards, -1)
        yield x, y


def shard_batch(batch, sharding: jax.sharding.Sharding):
    """Places a host batch (pytree of arrays) on devices with ``sharding`` (batch axis 0)."""
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)
