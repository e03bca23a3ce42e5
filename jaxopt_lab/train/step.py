"""One train step, run three ways: ``jit``, ``pmap`` over a named axis, ``jit`` on a mesh.

The step is a pure function ``step(state, x, y) -> (state, metrics)``. The same function
is jitted on one device, pmapped with ``axis_name`` (gradients, metrics and BatchNorm
statistics averaged over that axis), or jitted with ``NamedSharding`` over a
``jax.sharding.Mesh`` (the first-class multi-device path in current JAX). For the same
global batch, seed and steps the three agree to float tolerance.

Examples:
  >>> import optax, jaxopt_lab as jol
  >>> data = jol.app.load_digits()
  >>> model, tx = jol.app.MLP(hidden=(32,)), optax.adam(1e-3)
  >>> state = jol.train.create_train_state(model, tx, data.train.x)
  >>> step = jax.jit(jol.train.make_train_step(model, tx))
  >>> state, metrics = step(state, data.train.x[:64], data.train.y[:64])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Params = Any
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ParamTransform = Callable[[Params], Params]
# objective(params, model_state, x, y, rng) -> (loss, (logits, new_model_state, extra_metrics))
Objective = Callable[..., tuple[jax.Array, tuple[jax.Array, dict, dict]]]


class TrainState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Attributes:
      step: number of steps taken (int32 scalar).
      params: the trainable parameters.
      model_state: non-trainable collections, e.g. ``{"batch_stats": ...}`` or ``{}``.
      opt_state: the optax state (prune masks, QAT step sizes... live here too).
      rng: PRNG key, split every step (dropout and other stochastic layers).
    """

    step: jax.Array
    params: Params
    model_state: dict
    opt_state: optax.OptState
    rng: jax.Array


def cross_entropy(logits: jax.Array, y: jax.Array, x: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (the default loss)."""
    del x
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def split_variables(variables: dict) -> tuple[Params, dict]:
    """Splits linen variables into ``(params, other collections)``."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, x_example, *, seed: int = 0,
    variables: dict | None = None,
) -> TrainState:
    """Initialises the model (unless ``variables`` is given) and the optimizer state."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        # Jitted: eager init of a conv net dispatches op by op and is much slower.
        init = jax.jit(functools.partial(model.init, train=False))
        variables = init(init_key, jnp.asarray(x_example[:1]))
    params, model_state = split_variables(variables)
    return TrainState(jnp.zeros((), jnp.int32), params, model_state, tx.init(params), rng)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    axis_name: str | None = None,
    objective: Objective | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """Builds a pure train step ``step(state, x, y) -> (state, metrics)``.

    Every train step of the package comes from here: :func:`jit_train_step`,
    :func:`pmap_train_step`, :func:`mesh_train_step`, the distributed step and the
    distillation step (which plugs in a distillation loss or, with feature hints, an
    ``objective``).

    Args:
      model: a linen module called as ``model.apply(variables, x, train=True)``.
      tx: any optax transformation (``optax.chain`` with ``jol.prune(...)`` included).
      loss: ``loss(logits, y, x) -> scalar``; defaults to softmax cross-entropy.
      param_transform: applied to the params inside the loss before the forward pass,
        e.g. ``lambda p: jol.fake_quant(p, bits=4)`` for quantization-aware training.
      axis_name: the ``pmap`` axis; when set, gradients, metrics and the new
        collections are averaged over it (give the model's BatchNorm the same
        ``axis_name`` so the forward pass uses global batch statistics).
      objective: replaces the forward pass and loss built from ``model``, ``loss`` and
        ``param_transform`` (pass neither with it): ``objective(params, model_state, x,
        y, rng) -> (loss, (logits, new_model_state, extra_metrics))``, differentiated
        with respect to ``params``; ``extra_metrics`` (a dict) joins ``loss`` and
        ``accuracy`` in the step's metrics. See :func:`model_objective`.

    Returns:
      The step function; wrap it in ``jax.jit``, ``jax.pmap`` or use
      :func:`pmap_train_step` / :func:`mesh_train_step`.

    Raises:
      ValueError: ``objective`` together with ``loss`` or ``param_transform``.
    """
    if objective is None:
        objective = model_objective(model, loss=loss, param_transform=param_transform)
    elif loss is not None or param_transform is not None:
        raise ValueError("make_train_step: pass objective= or loss=/param_transform=, not both")

    def step(state: TrainState, x, y):
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (value, (logits, model_state, extra)), grads = grad_fn(
            state.params, state.model_state, x, y, step_rng
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        metrics = {"loss": value, "accuracy": accuracy, **extra}
        if axis_name is not None:
            grads, metrics, model_state = jax.lax.pmean((grads, metrics, model_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, model_state, opt_state, rng), metrics

    return step


def model_objective(
    model: nn.Module, *, loss: LossFn | None = None,
    param_transform: ParamTransform | None = None,
) -> Objective:
    """The default objective of :func:`make_train_step`: ``loss`` of ``model``'s logits.

    The forward pass runs in training mode with the non-param collections mutable (their
    new values are returned) and a fresh ``"dropout"`` key each step.
    """
    loss = cross_entropy if loss is None else loss

    def objective(params, model_state, x, y, rng):
        p = params if param_transform is None else param_transform(params)
        mutable = list(model_state) or False
        out = model.apply(
            {"params": p, **model_state}, x, train=True, mutable=mutable, rngs={"dropout": rng}
        )
        logits, new_model_state = out if mutable else (out, {})
        return loss(logits, y, x), (logits, dict(new_model_state), {})

    return objective


def jit_train_step(model, tx, **kwargs):
    """The single-device path: ``jax.jit(make_train_step(...))``."""
    return jax.jit(make_train_step(model, tx, **kwargs))


def replicate(tree, devices=None):
    """Stacks a tree once per device (leading axis) for ``pmap``."""
    n = len(devices or jax.local_devices())
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def unreplicate(tree):
    """Takes replica 0 of a pmapped tree."""
    return jax.tree.map(lambda a: a[0], tree)


def shard_batch_for_pmap(x: np.ndarray, num_devices: int) -> np.ndarray:
    """Reshapes a global batch ``(B, ...)`` to ``(num_devices, B // num_devices, ...)``."""
    if x.shape[0] % num_devices:
        raise ValueError(f"global batch {x.shape[0]} is not divisible by {num_devices} devices")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])


def pmap_train_step(model, tx, *, axis_name: str = "batch", devices=None, **kwargs):
    """The legacy ``pmap`` path: state replicated, batch split over the leading axis.

    Use with :func:`replicate` on the state and :func:`shard_batch_for_pmap` on the batch.
    """
    step = make_train_step(model, tx, axis_name=axis_name, **kwargs)
    return jax.pmap(step, axis_name=axis_name, devices=devices)


def data_mesh(num_devices: int | None = None, axis: str = "data") -> Mesh:
    """A 1-D device mesh over the first ``num_devices`` devices."""
    devices = jax.devices()[: num_devices or jax.device_count()]
    return Mesh(np.asarray(devices), (axis,))


def mesh_train_step(model, tx, mesh: Mesh, *, data_axis: str = "data", **kwargs):
    """The first-class path: ``jit`` with the batch sharded by ``NamedSharding``.

    The state is replicated over the mesh and the batch split along ``data_axis``; XLA
    inserts the gradient all-reduce. Returns ``(step, put_state, put_batch)``: the jitted
    step and helpers that place a state and a global batch on the mesh.
    """
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P(data_axis))
    step = jax.jit(
        make_train_step(model, tx, **kwargs),
        in_shardings=(replicated, batched, batched),
        out_shardings=(replicated, replicated),
    )

    def put_state(state):
        return jax.device_put(state, replicated)

    def put_batch(x, y):
        n = mesh.shape[data_axis]
        if x.shape[0] % n:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by {n} mesh devices")
        return jax.device_put(x, batched), jax.device_put(y, batched)

    return step, put_state, put_batch


def placed_train_step(model, tx, *, mesh: Mesh | None = None, loss=None,
                      param_transform=None):
    """``(step, put_state, put_batch)`` for one device (``mesh=None``) or a 1-D data mesh.

    The one step construction behind :func:`jaxopt_lab.train.fit` and
    :func:`jaxopt_lab.train.train_resumable`. Cached on its (hashable) arguments, so that
    another run in the same process (a notebook, a retry, a resumption) reuses the
    compiled step instead of compiling it again.
    """
    key = (model, tx, mesh, loss, param_transform)
    try:
        hash(key)
    except TypeError:  # e.g. a module with a list attribute: build the step uncached
        return _placed_train_step.__wrapped__(*key)
    return _placed_train_step(*key)


@functools.lru_cache(maxsize=8)
def _placed_train_step(model, tx, mesh, loss, param_transform):
    kwargs = {"loss": loss, "param_transform": param_transform}
    if mesh is None:
        return jax.jit(make_train_step(model, tx, **kwargs)), _same, _pair
    if mesh.devices.ndim != 1:
        raise ValueError(f"mesh must be 1-D (data parallel), got axes {mesh.axis_names}")
    return mesh_train_step(model, tx, mesh, data_axis=mesh.axis_names[0], **kwargs)


def _same(state):
    return state


def _pair(x, y):
    return x, y
