"""The one training loop, and evaluation, early stopping and ``fit`` on top of it.

:func:`train_loop` runs a train step over a stream of batches and calls hooks after each
step and each epoch. Every training run of the package goes through it: :func:`fit`
(validation, early stopping and the kept variables are its epoch hook),
:func:`~jaxopt_lab.train.train_resumable` (checkpointing is its step hook), the main
job's training (``fit``) and the vmapped hyperparameter sweep (its ``scan`` mode).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxopt_lab import metrics as _metrics
from jaxopt_lab.train.data import Dataset, Split, batches
from jaxopt_lab.train.step import (
    LossFn,
    ParamTransform,
    create_train_state,
    TrainState,
    placed_train_step,
)

Step = Callable[..., tuple[Any, dict]]
StepHook = Callable[[Any, dict, Any, int], bool | None]
EpochHook = Callable[[int, Any, list[dict]], bool | None]


def train_loop(
    step: Step,
    state: Any,
    epochs: Iterable[Iterable[Any]] | tuple[jax.Array, ...],
    *,
    max_steps: int | None = None,
    step_args: Callable[[Any], tuple] | None = None,
    after_step: StepHook | None = None,
    after_epoch: EpochHook | None = None,
    scan: bool = False,
) -> tuple[Any, Any]:
    """Runs ``state, metrics = step(state, *batch)`` over every batch of every epoch.

    Args:
      step: a train step ``(state, *args) -> (state, metrics)``, e.g. from
        :func:`make_train_step` (jitted) or :func:`placed_train_step`.
      state: the initial state (a :class:`TrainState` or any pytree the step takes).
      epochs: an iterable of epochs, each an iterable of batches (a resumable run passes
        one endless epoch); with ``scan``, a tuple of arrays stacked along a leading step
        axis.
      max_steps: stop after this many steps in total (``None``: when the batches end).
        No batch is drawn beyond it, and the epoch hook is not called for the epoch it
        cuts (even at that epoch's last batch: the loop does not draw ahead to know).
      step_args: maps a batch to the step's arguments after the state (e.g. placing it
        on a device mesh, or dropping a data position); default ``tuple(batch)``.
      after_step: ``after_step(state, metrics, batch, steps_done)``, called after every
        step (checkpointing, logging); returning True stops the loop.
      after_epoch: ``after_epoch(epoch, state, metrics)``, with ``metrics`` the list of
        this epoch's step metrics (possibly empty), called after every epoch
        (validation, early stopping); returning True stops the loop.
      scan: run the steps under ``jax.lax.scan`` instead of a Python loop: traceable,
        so that a whole run can be jitted and vmapped. No hooks in this mode.

    Returns:
      ``(state, metrics)``: the final state and, in ``scan`` mode, every step's metrics
      stacked along a leading axis; otherwise the last step's metrics (``None`` if no
      step ran).

    Raises:
      ValueError: ``max_steps < 0``, or hooks, ``step_args`` or ``max_steps`` with
        ``scan``.

    Examples:
      >>> import optax, jaxopt_lab as jol
      >>> data = jol.app.load_digits()
      >>> model, tx = jol.app.MLP(hidden=(8,)), optax.adam(1e-2)
      >>> state = jol.train.create_train_state(model, tx, data.train.x)
      >>> step = jax.jit(jol.train.make_train_step(model, tx))
      >>> epochs = (jol.train.batches(data.train, 256, epoch=e) for e in range(2))
      >>> state, metrics = jol.train.train_loop(step, state, epochs, max_steps=6)
      >>> int(state.step), sorted(metrics)  # 4 batches in epoch 0, then 2 of epoch 1
      (6, ['accuracy', 'loss'])
    """
    if scan:
        if any(v is not None for v in (max_steps, step_args, after_step, after_epoch)):
            raise ValueError("train_loop(scan=True) takes no hooks, step_args or max_steps")

        def body(state, batch):
            return step(state, *batch)

        return jax.lax.scan(body, state, tuple(epochs))
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    step_args = tuple if step_args is None else step_args
    done, last = 0, None
    for epoch, batches_of_epoch in enumerate(epochs):
        # The budget is checked before a batch is drawn, so that a stream resumed later
        # (a resumable run) has given out exactly the batches trained on.
        if max_steps is not None and done >= max_steps:
            break
        # Kept only for the epoch hook: an endless epoch would otherwise hold every step's.
        epoch_metrics = []
        for batch in batches_of_epoch:
            state, last = step(state, *step_args(batch))
            done += 1
            if after_epoch is not None:
                epoch_metrics.append(last)
            stop = after_step is not None and after_step(state, last, batch, done)
            if stop or (max_steps is not None and done >= max_steps):
                return state, last
        if after_epoch is not None and after_epoch(epoch, state, epoch_metrics):
            break
    return state, last


class EarlyStoppingState(NamedTuple):
    """Best validation metric so far, the epoch it was reached, and epochs since."""

    best: float
    best_epoch: int
    bad_epochs: int


def early_stopping_init(mode: str = "max") -> EarlyStoppingState:
    """Initial early-stopping state; ``mode`` is ``"max"`` (accuracy) or ``"min"`` (loss)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return EarlyStoppingState(-math.inf if mode == "max" else math.inf, -1, 0)


def early_stopping_update(
    state: EarlyStoppingState, metric: float, epoch: int, *, patience: int,
    mode: str = "max", min_delta: float = 0.0,
) -> tuple[EarlyStoppingState, bool, bool]:
    """Records one validation metric; returns ``(state, improved, should_stop)``.

    Training should stop once ``patience`` consecutive epochs failed to improve the
    best metric by more than ``min_delta``.

    Raises:
      ValueError: ``patience < 0``, unknown ``mode`` or a non-finite metric.
    """
    if patience < 0:
        raise ValueError(f"patience must be >= 0, got {patience}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if not math.isfinite(metric):
        raise ValueError(f"validation metric is not finite: {metric}")
    gain = metric - state.best if mode == "max" else state.best - metric
    if gain > min_delta or state.best_epoch < 0:
        return EarlyStoppingState(metric, epoch, 0), True, False
    bad = state.bad_epochs + 1
    return state._replace(bad_epochs=bad), False, bad > patience


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(model: nn.Module, variables, x):
    return model.apply(variables, x, train=False)


def predict(model: nn.Module, variables, x, *, batch_size: int = 512) -> np.ndarray:
    """Eval-mode logits for ``x``, computed in jitted batches."""
    x = np.asarray(x)
    out = [np.asarray(_logits(model, variables, x[i : i + batch_size]))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def evaluate(model: nn.Module, variables, split: Split, *, batch_size: int = 512,
             num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, macro F1 and mean cross-entropy of a model on one split."""
    logits = predict(model, variables, split.x, batch_size=batch_size)
    num_classes = num_classes or logits.shape[-1]
    pred = logits.argmax(-1)
    y = np.asarray(split.y)
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y))
    return {
        "accuracy": float(_metrics.accuracy(y, pred)),
        "f1_macro": float(_metrics.f1(y, pred, average="macro", labels=np.arange(num_classes))),
        "loss": float(loss.mean()),
    }


def fit(
    model: nn.Module,
    data: Dataset,
    tx: optax.GradientTransformation,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    variables: dict | None = None,
    loss: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    patience: int | None = None,
    keep: str = "best",
    mesh: Mesh | None = None,
    progress: bool = False,
    step: Callable | None = None,
) -> tuple[dict, dict[str, Any]]:
    """Trains ``model`` on ``data.train``, keeping the best weights on ``data.val``.

    Args:
      model: a linen module taking ``(x, train)``.
      data: a :class:`Dataset` (e.g. ``jol.app.load_digits()``).
      tx: any optax transformation, e.g. ``optax.chain(optax.adam(1e-3), jol.prune(...))``.
      epochs: maximum number of passes over the training split.
      batch_size: examples per step (the last partial batch is dropped); with ``mesh``, the
        global batch, split over the mesh's devices.
      seed: initialisation and shuffling seed.
      variables: start from these variables (fine-tuning) instead of a fresh init.
      loss: ``loss(logits, y, x) -> scalar``; defaults to cross-entropy.
      param_transform: applied to params before the forward pass (QAT with ``fake_quant``).
      patience: stop after this many epochs without validation improvement (None: never).
      keep: ``"best"`` returns the variables of the best validation epoch; ``"last"`` those
        of the last epoch -- what a gradual-pruning run wants, since an earlier, better
        epoch may not have reached the final sparsity yet.
      mesh: train data-parallel on this 1-D mesh (see :func:`data_mesh`): the batch is
        sharded along its axis, the state replicated, as :func:`mesh_train_step` does.
      progress: show a tqdm progress bar.
      step: a train step ``(state, x, y) -> (state, metrics)`` to run instead of the one
        built from ``model``, ``tx``, ``loss`` and ``param_transform`` -- for example one
        jitted step with a hyperparameter argument shared by several runs, so that they
        compile once. ``tx`` still builds the initial optimizer state. Not with ``mesh``.

    Returns:
      ``(variables, history)``: the kept variables (``{"params": ..., **collections}``;
      params passed through ``param_transform`` are *not* applied) and a history dict
      with per-epoch ``train_loss`` and ``val_accuracy``, ``best_epoch`` and
      ``final_state`` (the :class:`TrainState` after the last epoch).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    if step is not None and mesh is not None:
        raise ValueError("fit: pass either step= or mesh=, not both")
    state = create_train_state(model, tx, data.train.x, seed=seed, variables=variables)
    place = None  # one device: the host batch goes to the jitted step as it is
    if step is None:
        step, put_state, put_batch = placed_train_step(
            model, tx, mesh=mesh, loss=loss, param_transform=param_transform)
        state = put_state(state)
        if mesh is not None:
            place = _splat(put_batch)
    # Validation sees what the forward pass sees; jitted, since an eager param_transform
    # (fake_quant) would compile each of its ops separately every epoch.
    current_variables = jax.jit(lambda params, model_state: {
        "params": params if param_transform is None else param_transform(params),
        **model_state})

    history: dict[str, Any] = {"train_loss": [], "val_accuracy": []}
    track = _Tracked(state, early_stopping_init("max"))
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=f"train {type(model).__name__}", leave=False)

    def after_epoch(epoch: int, state: TrainState, metrics: list[dict]) -> bool:
        if not metrics:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(data.train.y)} training examples"
            )
        history["train_loss"].append(float(jnp.mean(jnp.stack([m["loss"] for m in metrics]))))
        seen = current_variables(state.params, state.model_state)
        val = evaluate(model, seen, data.val, num_classes=data.num_classes)["accuracy"]
        history["val_accuracy"].append(val)
        track.stopper, improved, stop = early_stopping_update(
            track.stopper, val, epoch, patience=patience if patience is not None else epochs
        )
        if improved:
            track.best = state
        return patience is not None and stop

    state, _ = train_loop(
        step, state, (batches(data.train, batch_size, seed=seed, epoch=e) for e in epoch_iter),
        step_args=place, after_epoch=after_epoch)
    history["best_epoch"] = track.stopper.best_epoch
    history["final_state"] = state
    kept = state if keep == "last" else track.best
    return {"params": kept.params, **kept.model_state}, history


class _Tracked:
    """What ``fit``'s epoch hook updates: the best state so far and the stopper."""

    def __init__(self, best: TrainState, stopper: EarlyStoppingState):
        self.best, self.stopper = best, stopper


def _splat(put_batch):
    return lambda batch: put_batch(*batch)
