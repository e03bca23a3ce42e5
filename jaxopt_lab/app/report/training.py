"""Training for the main job: ``jol.train.fit`` on one device or on a device mesh.

With ``devices`` set, every run (teacher, fine-tunes, distillation) is ``fit`` with
``mesh=data_mesh(devices)``: ``jit`` with the batch sharded over a 1-D device mesh and the
state replicated, early stopping on validation accuracy as on one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab import train
from jaxopt_lab.train.step import LossFn, ParamTransform

Variables = Any


def check_devices(devices: int | None) -> None:
    """Raises ``ValueError`` unless ``devices`` is None or between 1 and the device count."""
    if devices is None:
        return
    available = jax.device_count()
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if devices > available:
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                "starting to get N host devices)" if jax.default_backend() == "cpu" else "")
        raise ValueError(
            f"--devices {devices} asked for, but only {available} {jax.default_backend()} "
            f"device(s) are available{hint}"
        )


def global_batch(batch_size: int, num_train: int, devices: int | None) -> int:
    """The batch actually used: at most the training set, a multiple of ``devices``."""
    n = devices or 1
    batch = min(batch_size, num_train)
    batch = n * math.ceil(batch / n)
    if batch > num_train:
        raise ValueError(
            f"{num_train} training examples are too few for a batch over {n} devices"
        )
    return batch


def run_once(fn, *args):
    """``fn(*args)`` as one program compiled for a single run.

    On CPU the backend's optimisation passes cost seconds and buy nothing for a program
    that runs once (initialisation, quantization), so they are turned off there; eager
    execution would instead compile every op separately.
    """
    lowered = jax.jit(fn).lower(*args)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(*args)


def init_variables(model: nn.Module, x_example, seed: int) -> Variables:
    """``create_train_state``'s initialisation (same key), compiled once with :func:`run_once`."""
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    return run_once(functools.partial(model.init, train=False), init_key,
                    jnp.asarray(x_example[:1]))


def fit_model(
    model: nn.Module,
    data: train.Dataset,
    tx: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    devices: int | None = None,
    variables: Variables | None = None,
    loss: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    patience: int | None = None,
    progress: bool = False,
    keep_last: bool = False,
    on_history: Callable[[dict[str, Any]], None] | None = None,
) -> Variables:
    """Trains and returns the best variables (``fit``'s contract), on a mesh if ``devices``.

    ``keep_last`` returns the final variables instead of the best on validation: a
    gradual-pruning run must end at its final sparsity, not at an earlier, denser epoch.
    Returned variables are host (numpy) arrays, so later steps never depend on where
    training ran. ``on_history`` receives :func:`run_summary` of the run; with ``progress``
    an early stop is announced, since the progress bar itself vanishes.
    """
    batch = global_batch(batch_size, len(data.train.y), devices)
    if variables is None:
        variables = init_variables(model, data.train.x, seed)
    out, history = train.fit(model, data, tx, epochs=epochs, batch_size=batch, seed=seed,
                             variables=variables, loss=loss, param_transform=param_transform,
                             patience=patience, keep="last" if keep_last else "best",
                             mesh=None if devices is None else train.data_mesh(devices),
                             progress=progress)
    summary = run_summary(history, epochs)
    if progress and summary["stopped_early"]:
        from tqdm.auto import tqdm

        tqdm.write(f"train {type(model).__name__}: {summary['message']}")
    if on_history is not None:
        on_history(summary)
    return jax.tree.map(np.asarray, out)


def run_summary(history: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The learning curve and early-stopping outcome of one ``train.fit`` history.

    Epochs are counted from 1. ``message`` reads "stopped early at epoch N (best val at
    M)" when early stopping ended the run before ``epochs``.
    """
    ran = len(history["val_accuracy"])
    best = int(history["best_epoch"]) + 1
    stopped = ran < epochs
    message = (f"stopped early at epoch {ran} (best val at {best})" if stopped
               else f"ran all {ran} epochs (best val at {best})")
    return {"train_loss": [float(v) for v in history["train_loss"]],
            "val_accuracy": [float(v) for v in history["val_accuracy"]],
            "epochs": epochs, "epochs_run": ran, "best_epoch": best,
            "stopped_early": stopped, "message": message}


def fit_each(
    model: nn.Module,
    data: train.Dataset,
    make_tx,
    values,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    variables: Variables,
    devices: int | None = None,
) -> list[Variables]:
    """Fine-tunes ``variables`` once per value of a scalar setting of the optimizer.

    ``make_tx(value)`` builds the optax transformation; the value is an argument of one
    jitted step, so every run shares one compiled program (a pruning step compiles in
    seconds on a small CPU). Each run is ``train.fit(..., keep="last", step=...)`` with
    that shared step. With ``devices``, runs go through :func:`fit_model` one by one.
    """
    if devices is not None:
        return [fit_model(model, data, make_tx(v), epochs=epochs, batch_size=batch_size,
                          seed=seed, devices=devices, variables=variables, keep_last=True)
                for v in values]
    batch = global_batch(batch_size, len(data.train.y), None)

    @jax.jit
    def step(state, x, y, value):
        return train.make_train_step(model, make_tx(value))(state, x, y)

    out = []
    for v in values:
        value = jnp.float32(v)
        trained, _ = train.fit(model, data, make_tx(value), epochs=epochs, batch_size=batch,
                               seed=seed, variables=variables, keep="last",
                               step=functools.partial(step, value=value))
        out.append(jax.tree.map(np.asarray, trained))
    return out
