"""Input validation shared by the metrics: shapes always, values only when concrete.

Under ``jit`` the values are tracers, so only shape checks can run; with concrete
inputs (NumPy, lists, committed ``jax.Array``) the values are checked as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

AVERAGES = ("binary", "micro", "macro", "weighted", None)


def is_traced(*xs: Any) -> bool:
    """True when any input is a tracer (inside ``jit``/``vmap``/``pmap``)."""
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def float_dtype(*xs: jax.Array) -> jnp.dtype:
    """The float dtype to compute in: at least float32, float64 when x64 inputs ask."""
    return jnp.promote_types(jnp.result_type(*xs, float), jnp.float32)


def as_array(name: str, x: ArrayLike, ranks: Sequence[int]) -> jax.Array:
    """``x`` as a non-empty array of one of the allowed ranks, or a ``ValueError``."""
    if x is None:
        raise ValueError(f"{name} is None; expected an array")
    arr = x if is_traced(x) else jnp.asarray(x)
    if jnp.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need at least one sample")
    return arr


def same_length(**arrays: jax.Array | None) -> int:
    """The common number of samples (first axis), or a ``ValueError`` naming the mismatch."""
    lengths = {k: v.shape[0] for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs have different numbers of samples: {lengths}")
    return next(iter(lengths.values()))


def check_finite(name: str, x: jax.Array) -> None:
    """Raises if a concrete ``x`` holds NaN or Inf (sklearn rejects them too)."""
    if is_traced(x):
        return
    values = np.asarray(x)
    if jnp.issubdtype(values.dtype, jnp.floating):  # bfloat16 too
        bad = np.flatnonzero(~np.isfinite(values.ravel()))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"{name} contains NaN or Inf: {name}.ravel()[{i}] = {values.ravel()[i]}"
            )


def check_class_labels(name: str, y: jax.Array) -> None:
    """Concrete class labels must be finite whole numbers (sklearn calls others continuous)."""
    check_finite(name, y)
    if is_traced(y):
        return
    values = np.asarray(y)
    if jnp.issubdtype(values.dtype, jnp.floating):  # bfloat16 too
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise ValueError(
                f"{name} must hold class labels; got non-integer {name}[{bad[0]}] = "
                f"{values[bad[0]]} (continuous targets are not classification labels)"
            )


def sample_weights(sample_weight: ArrayLike | None, n: int) -> jax.Array | None:
    """Validated ``(n,)`` weights: finite and non-negative when concrete."""
    if sample_weight is None:
        return None
    w = as_array("sample_weight", sample_weight, (1,))
    if w.shape[0] != n:
        raise ValueError(f"sample_weight has {w.shape[0]} entries but there are {n} samples")
    check_finite("sample_weight", w)
    if not is_traced(w):
        values = np.asarray(w)
        if (values < 0).any():
            i = int(np.flatnonzero(values < 0)[0])
            raise ValueError(f"sample_weight must be >= 0, got sample_weight[{i}] = {values[i]}")
        if values.sum() <= 0:
            raise ValueError("sample_weight sums to zero; the weighted metric is undefined")
    return w


def check_average(average: str | None, allowed: Sequence[str | None] = AVERAGES) -> None:
    if average not in allowed:
        raise ValueError(f"average={average!r} is not supported; choose one of {list(allowed)}")


def zero_division_value(zero_division: str | float) -> float:
    """sklearn's ``zero_division``: "warn" (no warning here) and 0 give 0.0; 1.0; or NaN."""
    if isinstance(zero_division, str):
        if zero_division == "warn":
            return 0.0
        if zero_division == "nan":
            return float("nan")
    elif zero_division in (0, 1) or np.isnan(zero_division):
        return float(zero_division)
    raise ValueError(f"zero_division must be 'warn', 0.0, 1.0 or nan, got {zero_division!r}")


def class_labels(
    y_true: jax.Array,
    y_pred: jax.Array | None,
    labels: ArrayLike | None,
    num_classes: int | None,
) -> np.ndarray | None:
    """The label set to score: explicit, ``arange(num_classes)``, or inferred when concrete.

    Returns ``None`` when the inputs are traced and neither ``labels`` nor ``num_classes``
    was given (the caller decides whether it needs the set).
    """
    ys = [y for y in (y_true, y_pred) if y is not None]
    if labels is not None and num_classes is not None:
        raise ValueError("pass either labels or num_classes, not both")
    if num_classes is not None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        for name, y in zip(("y_true", "y_pred"), ys):
            if not is_traced(y):
                values = np.asarray(y)
                bad = np.flatnonzero((values < 0) | (values >= num_classes))
                if bad.size:
                    raise ValueError(
                        f"{name} label out of range for num_classes={num_classes}: "
                        f"{name}[{bad[0]}] = {values[bad[0]]}"
                    )
        return np.arange(num_classes)
    if labels is not None:
        if is_traced(labels):
            raise ValueError("labels must be concrete (a list or NumPy array), not traced")
        out = np.asarray(labels)
        if out.ndim != 1 or out.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {out.shape}")
        if np.unique(out).size != out.size:
            raise ValueError(f"labels must be unique, got {out.tolist()}")
        return out
    if is_traced(*ys):
        return None
    return np.unique(np.concatenate([np.asarray(y).ravel() for y in ys]))
