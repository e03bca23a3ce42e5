"""Hyperparameter sweeps as one compiled program: every configuration trains under ``vmap``.

A configuration is one value of a scalar hyperparameter (a learning rate, a final
sparsity...), and ``make_optimizer(value)`` builds its optax transformation from the
traced value. :func:`sweep` stacks the values, ``jax.vmap`` s a whole training run from
shared initial variables -- every step of every epoch under ``lax.scan`` (the scan mode
of ``jol.train.train_loop``), then the evaluation -- over them, and compiles it once. Configurations are compared on the
validation split; the test split is reported only for the one selected (best validation
accuracy), so the reported test figure is not itself chosen by looking at the test set. Convolutions run as patch matrix products
inside the sweep (see ``jaxopt_lab._conv_matmul``): vmapped convolutions become grouped
ones, which XLA's CPU backend runs very slowly.

What it buys depends on the hardware: one compile instead of one per configuration, and
the configurations share whatever parallelism one small model leaves idle. A 2-core CPU
has little to spare: there 8 vmapped student runs take about 6.5x one run, somewhat less
than the same 8 run one after another (``benchmarks/sweep.py`` measures both, with and
without compilation).

Examples:
  >>> import optax, jaxopt_lab as jol
  >>> data = jol.app.load_digits()
  >>> rows = jol.app.sweep(jol.app.MLP(hidden=(32,)), data, lambda lr: optax.adam(lr),
  ...                  [1e-3, 3e-3], epochs=1, name="learning_rate")
  >>> list(rows[0])
  ['learning_rate', 'val_accuracy', 'train_loss', 'kernel_sparsity', 'selected']
  >>> sum(r["selected"] for r in rows), sum("test_accuracy" in r for r in rows)
  (1, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab import train
from jaxopt_lab.app import datasets, models
from jaxopt_lab._conv_matmul import convs_as_matmuls

Row = dict[str, float]
MakeOptimizer = Callable[[jax.Array], optax.GradientTransformation]

DEFAULT_VALUES = {
    "sparsity": (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    "learning_rate": (3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2),
}


def epoch_batches(split: train.Split, batch_size: int, epochs: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every training batch of every epoch, stacked: ``(steps, batch, ...)``, ``(steps, batch)``.

    The same batches, in the same order, as ``jol.train.fit`` with this ``seed``.
    """
    xs, ys = [], []
    for epoch in range(epochs):
        for x, y in train.batches(split, batch_size, seed=seed, epoch=epoch):
            xs.append(x)
            ys.append(y)
    if not xs:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(split.y)} training examples")
    return np.stack(xs), np.stack(ys)


def training_run(model: nn.Module, data: train.Dataset, make_optimizer: MakeOptimizer, *,
                 epochs: int, batch_size: int, seed: int) -> Callable[[jax.Array], dict]:
    """A pure ``value -> {"val_accuracy", "test_accuracy", "train_loss", "kernel_sparsity"}``:
    one whole run, jit/vmap-able.

    The batches and the initial variables are constants shared by every configuration,
    so configurations differ only by the hyperparameter.
    """
    xs, ys = epoch_batches(data.train, batch_size, epochs, seed)
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, xs[0, :1])
    val_x, val_y = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    test_x, test_y = jnp.asarray(data.test.x), jnp.asarray(data.test.y)

    def run(value: jax.Array) -> dict[str, jax.Array]:
        with convs_as_matmuls():  # batched convolutions are slow on CPU; matmuls are not
            return _run(value)

    def _run(value: jax.Array) -> dict[str, jax.Array]:
        tx = make_optimizer(value)
        state = train.create_train_state(model, tx, xs[0], seed=seed, variables=variables)
        step = train.make_train_step(model, tx)
        state, metrics = train.train_loop(step, state, (jnp.asarray(xs), jnp.asarray(ys)),
                                          scan=True)
        losses = metrics["loss"]
        trained = {"params": state.params, **state.model_state}

        def accuracy(x, y):
            return jnp.mean(jnp.argmax(model.apply(trained, x, train=False), -1) == y)

        return {
            "val_accuracy": accuracy(val_x, val_y),
            "test_accuracy": accuracy(test_x, test_y),
            "train_loss": losses[-1],
            "kernel_sparsity": jol.sparsity(state.params).overall,
        }

    return run


RESULT_KEYS = ("val_accuracy", "train_loss", "kernel_sparsity", "selected", "test_accuracy")


def _rows(name: str, values: np.ndarray, out: dict[str, Any]) -> list[Row]:
    """One row per value; test accuracy only on the row selected by validation accuracy
    (the first of equals)."""
    out = jax.device_get(out)
    rows = [{name: float(v), **{k: float(out[k][i]) for k in ("val_accuracy", "train_loss",
                                                               "kernel_sparsity")}}
            for i, v in enumerate(values)]
    best = int(np.argmax([r["val_accuracy"] for r in rows]))
    for i, row in enumerate(rows):
        row["selected"] = i == best
    rows[best]["test_accuracy"] = float(out["test_accuracy"][best])
    return rows


def _check_values(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, np.float32)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence of numbers, got {values!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"values must be finite, got {values!r}")
    return arr


def _check_types(model: Any, data: Any, make_optimizer: Any, **ints_and_name: Any) -> None:
    """``TypeError`` naming the first argument of :func:`sweep` of the wrong type."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}: "
                        f"{model!r:.80}")
    if not isinstance(data, train.Dataset):
        raise TypeError(f"data must be a jol.train.Dataset (see jol.train.make_dataset), got "
                        f"{type(data).__name__}")
    if not callable(make_optimizer):
        raise TypeError(f"make_optimizer must be a callable value -> optax transformation, got "
                        f"{type(make_optimizer).__name__}")
    name = ints_and_name.pop("name")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    for arg, v in ints_and_name.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{arg} must be an int, got {v!r}")


def sweep(
    model: nn.Module,
    data: train.Dataset,
    make_optimizer: MakeOptimizer,
    values: Sequence[float],
    *,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    name: str = "value",
) -> list[Row]:
    """Trains one configuration per value, all at once under ``jax.vmap``, in one program.

    Args:
      model: a linen model taking ``(x, train)``.
      data: a :class:`jol.train.Dataset`; trains on ``train``, compares configurations on
        ``val`` and reports ``test`` for the selected one only.
      make_optimizer: ``value -> optax transformation``; ``value`` is a traced float32
        scalar, e.g. ``lambda lr: optax.adam(lr)`` or a ``jol.prune`` chain whose
        schedule scales with it.
      values: the hyperparameter of each configuration.
      epochs: passes over the training split (no early stopping: one program).
      batch_size: examples per step.
      seed: initialisation and shuffling seed, shared by every configuration.
      name: the key of the value in each row.

    Returns:
      One row per value, in order: ``{name: value, "val_accuracy", "train_loss",
      "kernel_sparsity", "selected"}`` (validation accuracy, last training loss, fraction
      of zeros in the kernels, whether it has the best validation accuracy); the one
      selected row also holds ``"test_accuracy"``.

    Raises:
      TypeError: ``model`` not a linen ``Module``, ``data`` not a ``Dataset``,
        ``make_optimizer`` not callable, ``epochs``/``batch_size``/``seed`` not ints or
        ``name`` not a string (naming the argument).
      ValueError: empty or non-finite values, a ``name`` clashing with a result key,
        ``epochs < 1``, ``batch_size < 1``, a batch larger than the training split.

    Examples:
      >>> import optax, jaxopt_lab as jol
      >>> data = jol.app.load_digits()
      >>> rows = jol.app.sweep(jol.app.MLP(hidden=(16,)), data, lambda lr: optax.sgd(lr),
      ...                  [0.01, 0.1], epochs=1, name="learning_rate")
      >>> [r["learning_rate"] for r in rows]
      [0.009999999776482582, 0.10000000149011612]
    """
    _check_types(model, data, make_optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
                 name=name)
    arr = _check_values(values)
    if name in RESULT_KEYS:
        raise ValueError(f"name {name!r} clashes with a result column")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run = training_run(model, data, make_optimizer, epochs=epochs, batch_size=batch_size,
                       seed=seed)
    return _rows(name, arr, jax.jit(jax.vmap(run))(jnp.asarray(arr)))


def sparsity_optimizer(*, learning_rate: float, end_step: int) -> MakeOptimizer:
    """``final_sparsity -> adam + gradual magnitude pruning`` reaching it at ``end_step``.

    Zhu & Gupta's schedule from 0 is ``s_f`` times the schedule from 0 to 1, so the
    traced final sparsity only scales ``jol.polynomial_sparsity(0, 1, ...)``.
    """
    unit = jol.polynomial_sparsity(0.0, 1.0, 0, end_step, frequency=max(1, end_step // 10))

    def make(final_sparsity: jax.Array) -> optax.GradientTransformation:
        return optax.chain(optax.adam(learning_rate),
                           jol.prune(jol.magnitude_mask, lambda t: final_sparsity * unit(t)))

    return make


def student_sweep_setup(param: str, *, epochs: int, batch_size: int = 64,
                        learning_rate: float = 2e-3, data: train.Dataset | None = None,
                        seed: int = 0):
    """``(model, data, make_optimizer)`` for sweeping the student's ``param`` on digits."""
    if param not in DEFAULT_VALUES:
        raise ValueError(f"param must be one of {sorted(DEFAULT_VALUES)}, got {param!r}")
    data = datasets.load_digits(seed=seed) if data is None else data
    model = models.StudentCNN(num_classes=data.num_classes)
    if param == "learning_rate":
        return model, data, lambda lr: optax.adam(lr)
    steps = epochs * (len(data.train.y) // batch_size)
    return model, data, sparsity_optimizer(learning_rate=learning_rate,
                                           end_step=max(1, (3 * steps) // 4))


def sweep_student(*, param: str = "sparsity", values: Sequence[float] | None = None,
                  epochs: int = 5, batch_size: int = 64, seed: int = 0,
                  data: train.Dataset | None = None) -> list[Row]:
    """:func:`sweep` of the reference student on digits over final sparsities or learning
    rates (8 values by default)."""
    model, data, make = student_sweep_setup(param, epochs=epochs, batch_size=batch_size,
                                            data=data, seed=seed)
    values = DEFAULT_VALUES[param] if values is None else values
    return sweep(model, data, make, values, epochs=epochs, batch_size=batch_size, seed=seed,
                 name=param)


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (``-`` where a row has no test accuracy)."""
    if not rows:
        return ""
    keys = list(rows[0])
    keys += [k for r in rows for k in r if k not in keys]

    def cell(r, i, k):
        if k not in r:
            return "-"
        if isinstance(r[k], bool):
            return "yes" if r[k] else ""
        return f"{r[k]:.4g}" if i == 0 else f"{r[k]:.4f}"

    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    lines += ["| " + " | ".join(cell(r, i, k) for i, k in enumerate(keys)) + " |"
              for r in rows]
    return "\n".join(lines)
