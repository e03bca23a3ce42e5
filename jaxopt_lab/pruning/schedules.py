"""Sparsity schedules: plain jit-able functions ``step -> sparsity`` (float32 scalar).

A schedule takes any integer step: a Python int of any size, or an integer array of any
width (int64 too). Settings are int32 (optax counts are), so a step beyond ``2**31 - 1`` is
past every ``end_step`` and gives the final sparsity. A concrete negative step raises
``ValueError``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


_INT32 = np.iinfo(np.int32)


def _as_step(t) -> jax.Array:
    """``t`` as int32, saturated at ``2**31 - 1`` (past every int32 end step) instead of
    overflowing; a concrete negative step raises ``ValueError``."""
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        if t < 0:
            raise ValueError(f"schedule step must be >= 0, got {t}")
        return jnp.int32(min(int(t), _INT32.max))
    if isinstance(t, np.ndarray) and np.issubdtype(t.dtype, np.integer):
        if t.size and t.min() < 0:
            raise ValueError(f"schedule steps must be >= 0, got {t.min()}")
        if np.iinfo(t.dtype).max > _INT32.max:
            t = np.minimum(t, t.dtype.type(_INT32.max))
        return jnp.asarray(t.astype(np.int32))
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer) and jnp.iinfo(t.dtype).max > _INT32.max:
        t = jnp.minimum(t, jnp.asarray(_INT32.max, t.dtype))  # int64 / uint32 / uint64
        if jnp.issubdtype(t.dtype, jnp.signedinteger):
            t = jnp.maximum(t, jnp.asarray(_INT32.min, t.dtype))
    return t.astype(jnp.int32)


def _check_step(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value <= np.iinfo(np.int32).max:  # steps are int32 (optax counts)
        raise ValueError(f"{name} must be in [0, 2**31 - 1], got {value}")
    return int(value)


def constant_sparsity(sparsity: float) -> Schedule:
    """The same sparsity at every step.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1]``.

    Examples:
      >>> import jaxopt_lab as jol
      >>> float(jol.constant_sparsity(0.5)(123))
      0.5
    """
    value = _check_fraction("sparsity", sparsity)

    def schedule(step):
        _as_step(step)  # the same steps as the other schedules are valid
        return jnp.asarray(value, jnp.float32)

    return schedule


def one_shot_sparsity(sparsity: float, step: int) -> Schedule:
    """0 before ``step``, ``sparsity`` from ``step`` on (one-shot pruning at a chosen step).

    Examples:
      >>> import jaxopt_lab as jol
      >>> [float(jol.one_shot_sparsity(0.9, 10)(t)) for t in (9, 10)]
      [0.0, 0.8999999761581421]
    """
    value = _check_fraction("sparsity", sparsity)
    at = _check_step("step", step)

    def schedule(t):
        return jnp.where(_as_step(t) >= at, jnp.float32(value), jnp.float32(0.0))

    return schedule


def polynomial_sparsity(
    init_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    frequency: int = 1,
    power: float = 3,
) -> Schedule:
    """Zhu & Gupta (2017) gradual pruning.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` for ``t0 <= t <= t1``,
    ``s_i`` before ``t0`` and ``s_f`` from ``t1`` on. The value changes only every
    ``frequency`` steps after ``t0`` (so masks are recomputed only then), and reaches
    ``s_f`` exactly at ``t1``.

    Raises:
      ValueError: sparsities outside ``[0, 1]``, ``end_step <= begin_step``, negative
        steps, ``frequency < 1`` or ``power <= 0``.

    Examples:
      >>> import jaxopt_lab as jol
      >>> s = jol.polynomial_sparsity(0.0, 0.8, 0, 100)
      >>> [round(float(s(t)), 3) for t in (0, 50, 100, 200)]
      [0.0, 0.7, 0.8, 0.8]
    """
    s_i = _check_fraction("init_sparsity", init_sparsity)
    s_f = _check_fraction("final_sparsity", final_sparsity)
    t0 = _check_step("begin_step", begin_step)
    t1 = _check_step("end_step", end_step)
    if t1 <= t0:
        raise ValueError(f"end_step ({end_step}) must be > begin_step ({begin_step})")
    freq = _check_step("frequency", frequency)
    if freq < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    if not float(power) > 0:
        raise ValueError(f"power must be > 0, got {power!r}")

    def schedule(t):
        t = _as_step(t)
        held = t0 + ((jnp.maximum(t, t0) - t0) // freq) * freq  # last update step (no wrap)
        frac = jnp.clip((held - t0) / (t1 - t0), 0.0, 1.0).astype(jnp.float32)
        s = s_f + (s_i - s_f) * (1.0 - frac) ** power
        s = jnp.where(t >= t1, s_f, jnp.where(held <= t0, s_i, s))  # s_f from t1 on, always
        return jnp.asarray(s, jnp.float32)

    return schedule


def _deprecated(new: Callable, old: str) -> Callable:
    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(f"jaxopt_lab.{old} is deprecated (its name clashes with optax's "
                      f"{old}, which takes other arguments): use jaxopt_lab.{new.__name__}",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)
    alias.__name__ = old
    return alias


# Deprecated for one release: optax has schedules of these names with other arguments.
constant_schedule = _deprecated(constant_sparsity, "constant_schedule")
one_shot_schedule = _deprecated(one_shot_sparsity, "one_shot_schedule")
polynomial_schedule = _deprecated(polynomial_sparsity, "polynomial_schedule")
