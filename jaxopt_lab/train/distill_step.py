"""The distillation train step: a frozen teacher in inference mode, any optax student.

Logit distillation is the foundation's train step with a distillation loss:
:func:`kd_loss` returns a ``loss(logits, y, x)`` that runs the teacher on ``x``
(``train=False``, under ``stop_gradient``) and compares it with the student's logits,
so it also plugs into ``jol.train.fit``, ``pmap_train_step`` and ``mesh_train_step``.
Pruning (``jol.prune`` in the optax chain) and quantization-aware training
(``param_transform=lambda p: jol.fake_quant(p, ...)``) compose as in any train step.

With :class:`FeatureHint` s the step also matches intermediate features (FitNets);
learnable projections then train next to the student, so the trained parameters are
a :class:`HintedParams` ``(student, projection)`` pair.

Examples:
  >>> import jax, optax, jaxopt_lab as jol
  >>> data = jol.app.load_digits()
  >>> teacher, student = jol.app.MLP(hidden=(64,)), jol.app.MLP(hidden=(16,))
  >>> t_vars = jol.app.init_model(teacher, data.train.x)  # in practice: a trained teacher
  >>> tx = optax.adam(1e-3)
  >>> state = jol.distill.create_distill_state(student, tx, data.train.x)
  >>> step = jax.jit(jol.distill.make_distill_step(
  ...     student, teacher, t_vars, tx, temperature=4.0, alpha=0.9))
  >>> state, metrics = step(state, data.train.x[:32], data.train.y[:32])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distill.features import capture_features, init_projection
from jaxopt_lab.distill.losses import check_kd_settings, distill_loss, feature_distill_loss
from jaxopt_lab.train.step import (
    LossFn,
    ParamTransform,
    TrainState,
    create_train_state,
    make_train_step,
)

Params = Any
Step = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]


class FeatureHint(NamedTuple):
    """Match one teacher layer's output with one student layer's output.

    Attributes:
      teacher_layer: teacher layer name (see ``jol.distill.layer_names``).
      student_layer: student layer name; a projection is learned if widths differ.
      weight: multiplier of this hint's ``feature_distill_loss``.
      kind: ``"mse"`` or ``"cosine"``.
    """

    teacher_layer: str
    student_layer: str
    weight: float = 1.0
    kind: str = "mse"


class HintedParams(NamedTuple):
    """Trained parameters of a hinted distillation: the student's and the projections'.

    ``projection`` maps ``"hint_<i>"`` to the projection of hint ``i`` (absent when the
    widths already match). With ``jol.prune``, pass a ``where`` that skips them, e.g.
    ``where=lambda path, leaf: path[0].name == "student" and leaf.ndim >= 2``.
    """

    student: Params
    projection: dict


def teacher_outputs(
    teacher: nn.Module, teacher_variables: Mapping, x: jax.Array, *,
    layers: Sequence[str] = (), teacher_kwargs: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher logits (and features of ``layers``) in inference mode, gradient-free."""
    kwargs = {"train": False} if teacher_kwargs is None else dict(teacher_kwargs)
    if layers:
        out, feats = capture_features(teacher, teacher_variables, x, layers=layers, **kwargs)
    else:
        out, feats = teacher.apply(teacher_variables, x, **kwargs), {}
    return jax.lax.stop_gradient((out, feats))


def kd_loss(
    teacher: nn.Module, teacher_variables: Mapping, *, temperature: float = 1.0,
    alpha: float = 1.0, teacher_kwargs: Mapping[str, Any] | None = None,
) -> LossFn:
    """A ``loss(logits, y, x)`` for ``make_train_step``/``fit``: Hinton KD from ``teacher``.

    Args:
      teacher: the teacher module, called as ``teacher.apply(variables, x, train=False)``.
      teacher_variables: its trained variables (frozen: never differentiated).
      temperature: distillation temperature ``T``.
      alpha: weight of the soft-target term; ``1 - alpha`` weights the hard labels ``y``.
      teacher_kwargs: keyword arguments of the teacher call (default ``{"train": False}``).

    Raises:
      ValueError: ``temperature <= 0`` or ``alpha`` outside ``[0, 1]`` (checked now).
    """
    check_kd_settings(temperature, alpha)

    def loss(logits: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
        t_logits, _ = teacher_outputs(teacher, teacher_variables, x,
                                      teacher_kwargs=teacher_kwargs)
        return distill_loss(t_logits, logits, temperature=temperature, alpha=alpha, labels=y)

    return loss


def _projection_key(i: int) -> str:
    return f"hint_{i}"


def create_distill_state(
    student: nn.Module, tx: optax.GradientTransformation, x_example, *,
    teacher: nn.Module | None = None, teacher_variables: Mapping | None = None,
    hints: Sequence[FeatureHint] = (), seed: int = 0, variables: dict | None = None,
    teacher_kwargs: Mapping[str, Any] | None = None,
) -> TrainState:
    """The student's :class:`TrainState`; with ``hints``, params are :class:`HintedParams`.

    Without hints this is ``jol.train.create_train_state``. With hints, the teacher and
    student are traced abstractly once to size each hint's projection (created only when
    the widths differ).

    Raises:
      ValueError: hints without a teacher, or hint layers that do not exist.
    """
    if not hints:
        return create_train_state(student, tx, x_example, seed=seed, variables=variables)
    if teacher is None or teacher_variables is None:
        raise ValueError("hints need the teacher and teacher_variables to size projections")
    state = create_train_state(student, optax.identity(), x_example, seed=seed,
                               variables=variables)
    x1 = jnp.asarray(x_example[:1])
    _, t_feats = jax.eval_shape(lambda: teacher_outputs(
        teacher, teacher_variables, x1, layers=[h.teacher_layer for h in hints],
        teacher_kwargs=teacher_kwargs))
    _, s_feats = jax.eval_shape(lambda: capture_features(
        student, {"params": state.params, **state.model_state}, x1,
        layers=[h.student_layer for h in hints], train=False))
    proj_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    projection = {}
    for i, h in enumerate(hints):
        d_t, d_s = t_feats[h.teacher_layer].shape[-1], s_feats[h.student_layer].shape[-1]
        if d_t != d_s:
            projection[_projection_key(i)] = init_projection(
                jax.random.fold_in(proj_key, i), d_s, d_t
            )
    params = HintedParams(state.params, projection)
    return state._replace(params=params, opt_state=tx.init(params))


def student_variables(state: TrainState) -> dict:
    """The student's variables dict (``{"params": ..., **collections}``) from a state."""
    params = state.params.student if isinstance(state.params, HintedParams) else state.params
    return {"params": params, **state.model_state}


def make_distill_step(
    student: nn.Module, teacher: nn.Module, teacher_variables: Mapping,
    tx: optax.GradientTransformation, *, temperature: float = 1.0, alpha: float = 1.0,
    hints: Sequence[FeatureHint] = (), param_transform: ParamTransform | None = None,
    axis_name: str | None = None, teacher_kwargs: Mapping[str, Any] | None = None,
) -> Step:
    """Builds a pure distillation step ``step(state, x, y) -> (state, metrics)``.

    Without hints this is ``jol.train.make_train_step(student, tx, loss=kd_loss(...))``;
    with hints, ``make_train_step(student, tx, objective=...)`` with an objective adding
    the hint losses (reported as ``kd_loss`` and ``hint_loss`` metrics).
    Wrap the step in ``jax.jit``, or ``jax.pmap(step, axis_name=axis_name)``.

    Args:
      student: the student module (trained with ``train=True``).
      teacher: the frozen teacher (run with ``train=False``, no gradient).
      teacher_variables: the teacher's trained variables.
      tx: any optax transformation (``jol.prune(...)`` may be chained in).
      temperature: distillation temperature ``T``.
      alpha: weight of the soft-target term (``1 - alpha``: cross-entropy with ``y``).
      hints: feature hints; the state must come from :func:`create_distill_state` with
        the same hints.
      param_transform: applied to the student params before its forward pass (QAT).
      axis_name: the ``pmap`` axis over which gradients, metrics and collections are
        averaged.
      teacher_kwargs: keyword arguments of the teacher call (default ``{"train": False}``).

    Raises:
      ValueError: bad ``temperature``/``alpha`` or an unknown hint ``kind``.
    """
    loss = kd_loss(teacher, teacher_variables, temperature=temperature, alpha=alpha,
                   teacher_kwargs=teacher_kwargs)
    if not hints:
        return make_train_step(
            student, tx, loss=loss, param_transform=param_transform, axis_name=axis_name
        )
    for h in hints:
        if h.kind not in ("mse", "cosine"):
            raise ValueError(f"hint {h} kind must be 'mse' or 'cosine', got {h.kind!r}")
    t_layers = [h.teacher_layer for h in hints]
    s_layers = [h.student_layer for h in hints]

    def objective(params: HintedParams, model_state, x, y, rng):
        # Checked while tracing, before the first use of params.student.
        if not isinstance(params, HintedParams):
            raise ValueError("with hints, create the state with create_distill_state(hints=...)")
        p = params.student if param_transform is None else param_transform(params.student)
        mutable = list(model_state)
        result, s_feats = capture_features(
            student, {"params": p, **model_state}, x, layers=s_layers,
            mutable=mutable or False, train=True, rngs={"dropout": rng},
        )
        logits, new_model_state = result if mutable else (result, {})
        t_logits, t_feats = teacher_outputs(teacher, teacher_variables, x, layers=t_layers,
                                            teacher_kwargs=teacher_kwargs)
        kd = distill_loss(t_logits, logits, temperature=temperature, alpha=alpha, labels=y)
        hint = sum(
            h.weight * feature_distill_loss(
                t_feats[h.teacher_layer], s_feats[h.student_layer], kind=h.kind,
                projection=params.projection.get(_projection_key(i)),
            )
            for i, h in enumerate(hints)
        )
        return kd + hint, (logits, dict(new_model_state), {"kd_loss": kd, "hint_loss": hint})

    # The one step builder, with the hinted objective in place of the model's loss. Named
    # apart from the plain step, so that jit names, profiles and trace counters (which key
    # on a function's name and source) tell the two apart.
    step = make_train_step(student, tx, objective=objective, axis_name=axis_name)
    step.__name__ = step.__qualname__ = "hinted_distill_step"
    return step
