"""L1 and L2 regularisation as optax transformations.

Chain them *before* the optimizer so the penalty gradient is scaled by the learning
rate like the loss gradient: ``optax.chain(add_l1(1e-4), optax.adam(1e-3))``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab import _select

Params = Any


class AddL1State(NamedTuple):
    """``add_l1`` keeps no state."""


def _check_strength(strength: float, name: str) -> float:
    if not (isinstance(strength, (int, float)) and 0 <= strength < float("inf")):
        raise ValueError(f"{name} strength must be a finite non-negative number, got "
                         f"{strength!r}")
    return float(strength)  # a Python float: weakly typed, so updates keep their dtype


def add_l1(strength: float, *, where: _select.Where = None) -> optax.GradientTransformationExtraArgs:
    """Adds ``strength * sign(params)`` (the L1 subgradient) to the selected updates.

    Args:
      strength: the L1 coefficient ``lambda`` in ``loss + lambda * sum |w|``.
      where: which leaves are penalised (default: float leaves with ndim >= 2).

    Returns:
      An optax transformation; ``update`` needs ``params``.

    Examples:
      >>> import optax, jax.numpy as jnp, jaxopt_lab as jol
      >>> tx = optax.chain(jol.train.add_l1(1e-3), optax.sgd(0.1))
      >>> p = {"w": jnp.ones((2, 2))}
      >>> u, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(p), p)
    """
    strength = _check_strength(strength, "L1")

    def init_fn(params):
        del params
        return AddL1State()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("add_l1 needs params: call tx.update(grads, state, params)")
        chosen = _select.selection(params, where)
        updates = jax.tree.map(
            lambda u, p, s: u + strength * jnp.sign(p).astype(u.dtype) if s else u,
            updates, params, chosen,
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_l2(strength: float, *, where: _select.Where = None) -> optax.GradientTransformation:
    """Adds ``strength * params`` (the gradient of ``strength/2 * ||w||^2``) to the updates.

    This is optax's ``add_decayed_weights`` with the library's leaf selection.
    """
    strength = _check_strength(strength, "L2")
    return optax.add_decayed_weights(strength, mask=lambda p: _select.selection(p, where))
