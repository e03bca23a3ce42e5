"""Evaluation, early stopping and a small ``fit`` loop on top of the train step."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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
    placed_train_step,
)


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
    if step is None:
        step, put_state, put_batch = placed_train_step(
            model, tx, mesh=mesh, loss=loss, param_transform=param_transform)
        state = put_state(state)
        if mesh is not None:
            step = functools.partial(_sharded_step, step, put_batch)
    # Validation sees what the forward pass sees; jitted, since an eager param_transform
    # (fake_quant) would compile each of its ops separately every epoch.
    current_variables = jax.jit(lambda params, model_state: {
        "params": params if param_transform is None else param_transform(params),
        **model_state})

    history: dict[str, Any] = {"train_loss": [], "val_accuracy": []}
    stopper = early_stopping_init("max")
    best = state
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=f"train {type(model).__name__}", leave=False)
    for epoch in epoch_iter:
        losses = []
        for x, y in batches(data.train, batch_size, seed=seed, epoch=epoch):
            state, m = step(state, x, y)
            losses.append(m["loss"])
        if not losses:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(data.train.y)} training examples"
            )
        history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        seen = current_variables(state.params, state.model_state)
        val = evaluate(model, seen, data.val, num_classes=data.num_classes)["accuracy"]
        history["val_accuracy"].append(val)
        stopper, improved, stop = early_stopping_update(
            stopper, val, epoch, patience=patience if patience is not None else epochs
        )
        if improved:
            best = state
        if patience is not None and stop:
            break
    history["best_epoch"] = stopper.best_epoch
    history["final_state"] = state
    kept = state if keep == "last" else best
    return {"params": kept.params, **kept.model_state}, history


def _sharded_step(step, put_batch, state, x, y):
    return step(state, *put_batch(x, y))
