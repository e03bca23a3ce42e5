"""A training loop that survives interruption: resume from the newest checkpoint, bit for bit.

:func:`train_resumable` checkpoints the whole :class:`~jaxopt_lab.train.TrainState` and
the data-iterator position every ``save_every`` steps. Started again with the same
arguments after a crash, a preemption or a time-boxed stop, it restores the newest
checkpoint, replays the data stream from the saved position, and finishes with parameters
bit-identical to those of a run that was never interrupted (same machine and software).

Examples:
  >>> import tempfile, optax, jaxopt_lab as jol
  >>> data, d = jol.app.load_digits(), tempfile.mkdtemp()
  >>> model, tx = jol.app.MLP(hidden=(8,)), optax.adam(1e-2)
  >>> part = jol.train.train_resumable(model, data, tx, steps=6, ckpt_dir=d, save_every=2,
  ...                                  stop_after=3)  # stops at step 3; step 2 is saved
  >>> full = jol.train.train_resumable(model, data, tx, steps=6, ckpt_dir=d, save_every=2)
  >>> int(full.step)
  6
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import flax.linen as nn
import numpy as np
import optax
from jax.sharding import Mesh

from jaxopt_lab.train.checkpoint import Checkpointer, DataPosition
from jaxopt_lab.train.data import Dataset, Split, batches
from jaxopt_lab.train.loop import train_loop
from jaxopt_lab.train.step import (
    LossFn,
    ParamTransform,
    TrainState,
    create_train_state,
    placed_train_step,
)


def batches_from(
    split: Split, batch_size: int, position: DataPosition | None = None, *, seed: int = 0
) -> Iterator[tuple[DataPosition, np.ndarray, np.ndarray]]:
    """Endless ``(position_after, x, y)`` batches from ``position`` (default: the very start).

    Batches are those of :func:`~jaxopt_lab.train.batches` (shuffled by ``(seed, epoch)``,
    last partial batch dropped), so resuming from a saved position replays the exact
    sequence an uninterrupted run would have seen. ``position_after`` is the position to
    save once the yielded batch has been trained on.

    Raises:
      ValueError: ``batch_size`` exceeds the split, or the position is out of range
        (checked at the call, not at the first ``next``).

    Examples:
      >>> import itertools, jaxopt_lab as jol
      >>> split = jol.app.load_digits().train  # 1257 examples: 4 batches of 256 per epoch
      >>> stream = jol.train.batches_from(split, 256, jol.train.DataPosition(epoch=2, batch=3))
      >>> [p for p, x, y in itertools.islice(stream, 2)]
      [DataPosition(epoch=3, batch=0), DataPosition(epoch=3, batch=1)]
    """
    position = position or DataPosition()
    num_batches = len(split.y) // batch_size if batch_size > 0 else 0
    if num_batches == 0:
        raise ValueError(f"batch_size {batch_size} does not fit the {len(split.y)} examples")
    if position.epoch < 0 or not 0 <= position.batch <= num_batches:
        raise ValueError(f"data position {position} is out of range ({num_batches} batches)")
    return _stream(split, batch_size, position, seed, num_batches)


def _stream(split, batch_size, position, seed, num_batches):
    epoch, skip = position
    while True:
        for b, (x, y) in enumerate(batches(split, batch_size, seed=seed, epoch=epoch)):
            if b < skip:
                continue  # already trained on before the interruption
            last = b + 1 == num_batches
            yield (DataPosition(epoch + 1, 0) if last else DataPosition(epoch, b + 1)), x, y
        epoch, skip = epoch + 1, 0


def train_resumable(
    model: nn.Module,
    data: Dataset,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    ckpt_dir: str | os.PathLike,
    save_every: int,
    batch_size: int = 64,
    seed: int = 0,
    loss: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    variables: dict | None = None,
    mesh: Mesh | None = None,
    max_to_keep: int | None = 3,
    stop_after: int | None = None,
) -> TrainState:
    """Trains for ``steps`` steps in total, resuming from the newest checkpoint in ``ckpt_dir``.

    Args:
      model: a linen module taking ``(x, train)``.
      data: the data set; batches come from ``data.train``.
      tx: any optax transformation (``jol.prune(...)`` and QAT state are checkpointed too).
      steps: total number of train steps of the run (across all resumptions).
      ckpt_dir: checkpoint directory; reuse it to resume.
      save_every: checkpoint every this many steps (and always after the last step).
      batch_size: examples per step (global batch when ``mesh`` is given).
      seed: initialisation and shuffling seed (must match across resumptions).
      loss: ``loss(logits, y, x) -> scalar``; defaults to cross-entropy.
      param_transform: applied to params inside the loss (QAT with ``fake_quant``).
      variables: start from these variables instead of a fresh init (fine-tuning).
      mesh: run the data-parallel step on this mesh (see ``mesh_train_step``).
      max_to_keep: number of newest checkpoints to keep (``None``: all).
      stop_after: return after this many steps *in this call* (a time-boxed job); the
        next call with the same ``ckpt_dir`` resumes from the newest checkpoint.

    Returns:
      The final (or, with ``stop_after``, the current) :class:`TrainState`.

    Raises:
      ValueError: non-positive ``steps``/``save_every``/``stop_after``, or a checkpoint
        further than ``steps`` or of another structure in ``ckpt_dir``.
    """
    for name, value in (("steps", steps), ("save_every", save_every), ("stop_after", stop_after)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    state = create_train_state(model, tx, data.train.x, seed=seed, variables=variables)
    step_fn, put_state, put_batch = placed_train_step(
        model, tx, mesh=mesh, loss=loss, param_transform=param_transform)
    state = put_state(state)
    with Checkpointer(ckpt_dir, max_to_keep=max_to_keep) as ckpt:
        done, position = 0, DataPosition()
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state, position, done = restored
        if done > steps:
            raise ValueError(f"{ckpt.directory} holds step {done}, beyond steps={steps}")
        stream = batches_from(data.train, batch_size, position, seed=seed)
        budget = steps - done if stop_after is None else min(stop_after, steps - done)
        start = done

        def save(state: TrainState, metrics: dict, batch, ran: int) -> None:
            del metrics
            position, total = batch[0], start + ran
            if total % save_every == 0 or total == steps:
                ckpt.save(total, state, position)

        # One endless epoch; the budget stops it before a batch is drawn beyond it, so
        # the saved position is exactly where the next call resumes.
        state, _ = train_loop(step_fn, state, [stream], max_steps=budget,
                              step_args=lambda batch: put_batch(batch[1], batch[2]),
                              after_step=save)
    return state
