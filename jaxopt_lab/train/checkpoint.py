"""Saving and resuming a whole training run with orbax-checkpoint.

A checkpoint holds the full :class:`~jaxopt_lab.train.TrainState` (step, params, model
collections, the optax state with prune masks and QAT step sizes, the PRNG key) plus the
data-iterator position, under ``<directory>/<step>/``. orbax writes each step into a
temporary directory and renames it into place only once every file is written, so a
process killed mid-save leaves the earlier checkpoints intact; the half-written temporary
directory is ignored and removed the next time a :class:`Checkpointer` opens the directory.

Restoring needs a *target*: a state of the right structure (e.g. a freshly created one, or
``jax.ShapeDtypeStruct`` leaves). The restored tree has the target's exact types
(``NamedTuple`` optimizer states come back as themselves) and its shardings.

Examples:
  >>> import tempfile, optax, jaxopt_lab as jol
  >>> model, tx = jol.app.MLP(hidden=(8,)), optax.adam(1e-3)
  >>> state = jol.train.create_train_state(model, tx, jol.app.load_digits().train.x)
  >>> with jol.train.Checkpointer(tempfile.mkdtemp()) as ckpt:
  ...     ckpt.save(0, state, jol.train.DataPosition(epoch=0, batch=0))
  ...     restored, position = ckpt.restore(state)
  >>> position
  DataPosition(epoch=0, batch=0)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import LatestN

PyTree = Any


class DataPosition(NamedTuple):
    """Where the data iterator stands: ``batch`` batches of ``epoch`` are consumed."""

    epoch: int = 0
    batch: int = 0


def _leaf_name(path) -> str:
    """orbax's name for a leaf: key names joined by dots (``opt_state.1.masks.Dense_0.kernel``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# orbax refuses zero-size arrays, so they are written as None and listed (name -> shape,
# dtype) in the JSON item; restore checks the list against the target and rebuilds them.
def _is_empty(a) -> bool:
    return 0 in tuple(getattr(a, "shape", ()))


def _empty_leaves(tree: PyTree) -> dict[str, list]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_name(p): [list(a.shape), str(a.dtype)] for p, a in leaves if _is_empty(a)}


def _without_empty(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: None if _is_empty(a) else a, tree)


def _with_empty(abstract: PyTree, restored: PyTree) -> PyTree:
    def fill(a, r):
        if not _is_empty(a):
            return r
        return jnp.zeros(a.shape, a.dtype, device=getattr(a, "sharding", None))

    return jax.tree.map(fill, abstract, restored)


class Checkpointer:
    """Atomic, resumable checkpoints of a training state and its data position.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: keep only the newest this many checkpoints (``None``: keep all).
      asynchronous: write in a background thread so training continues during the save;
        :meth:`wait_until_finished` (called by :meth:`restore` and :meth:`close`) blocks.

    In a multi-process job every process constructs the Checkpointer and calls
    :meth:`save` / :meth:`restore` with the same arguments; orbax coordinates the writes.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 asynchronous: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,  # drop the leftovers of a save that was killed
            enable_async_checkpointing=asynchronous,
            preservation_policy=LatestN(max_to_keep),  # n=None keeps every step
        )
        # Named handlers let a fresh process read metadata before the first restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        # orbax removes leftover temporary directories in a background thread; finish that
        # now, or a Checkpointer opened next on the same directory races it to delete them.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()

    def save(self, step: int, state: PyTree, data_position: DataPosition | None = None, *,
             metadata: dict | None = None) -> None:
        """Writes checkpoint ``step``: ``state``, ``data_position`` and JSON ``metadata``.

        ``data_position`` defaults to the start of epoch 0. The step is complete on disk when
        this returns (or, with ``asynchronous=True``, after :meth:`wait_until_finished`).

        Raises:
          ValueError: a negative step or position, or ``step`` already exists.
          TypeError: ``metadata`` is not JSON-serialisable.
          OSError: the write failed (disk full, file-size limit...): naming the directory,
            the step and the cause; the step's temporary files are removed and earlier
            checkpoints stay intact and restorable.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        if step in self.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.directory}")
        data_position = data_position or DataPosition()
        if data_position.epoch < 0 or data_position.batch < 0:
            raise ValueError(f"data position must be non-negative, got {data_position}")
        try:
            json.dumps(metadata or {})
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        info = {"step": step, "epoch": int(data_position.epoch),
                "batch": int(data_position.batch), "metadata": metadata or {},
                "empty_leaves": _empty_leaves(state)}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(_without_empty(state)),
                                        data=ocp.args.JsonSave(info)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - tensorstore reports I/O errors as ValueError
            raise self._write_failed(step, e) from e

    def _write_failed(self, step: int, error: BaseException) -> OSError:
        """Removes the half-written temporary directory of ``step`` (orbax leaves it until
        the next Checkpointer opens the directory) and says what happened, and where."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 - the same failure, reported below
            pass
        # When one item fails, orbax gives no handle on the other items' writes still in
        # flight (tensorstore threads), which recreate folders under a removed temporary:
        # remove until it stays gone.
        deadline, quiet = time.monotonic() + 30, 0
        while quiet < 3 and time.monotonic() < deadline:
            leftovers = [n for n in os.listdir(self.directory)
                         if n.startswith(f"{step}.") and "tmp" in n]
            for name in leftovers:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            quiet = 0 if leftovers else quiet + 1
            time.sleep(0.1)
        code = re.search(r"os_error_code='(\d+)'", str(error))
        number = int(code.group(1)) if code else getattr(error, "errno", None)
        cause = os.strerror(number) if number else type(error).__name__
        return OSError(number, f"checkpoint step {step} could not be written ({cause}): "
                       f"{error}; its temporary files were removed and earlier checkpoints "
                       "are intact", self.directory)

    def restore(self, target: PyTree, *, step: int | None = None) -> tuple[PyTree, DataPosition]:
        """Loads checkpoint ``step`` (default: the latest) into the structure of ``target``.

        Args:
          target: a tree with the saved structure (arrays or ``jax.ShapeDtypeStruct``);
            restored leaves take its types and shardings.
          step: which checkpoint; ``None`` for the latest.

        Returns:
          ``(state, data_position)``.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          ValueError: the target's structure, shapes or dtypes differ from the checkpoint;
            the message names the checkpoint and the first offending leaves.
        """
        self.wait_until_finished()
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' {step}'} in {self.directory} "
                f"(available steps: {list(self.all_steps())})"
            )
        abstract = _abstract(target)
        info = self._info(step)
        saved_empty, wanted_empty = info.get("empty_leaves", {}), _empty_leaves(abstract)
        if saved_empty != wanted_empty:
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))}: zero-size leaves "
                f"differ, on disk {saved_empty} but in the target {wanted_empty}"
            )
        stripped = _without_empty(abstract)
        self._check_target(step, stripped)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(stripped))
        ).state
        state = _with_empty(abstract, restored)
        return state, DataPosition(int(info["epoch"]), int(info["batch"]))

    def restore_latest(self, target: PyTree) -> tuple[PyTree, DataPosition, int] | None:
        """``(state, data_position, step)`` of the newest checkpoint, or ``None`` if none."""
        step = self.latest_step()
        if step is None:
            return None
        state, position = self.restore(target, step=step)
        return state, position, step

    def metadata(self, step: int | None = None) -> dict:
        """The JSON ``metadata`` dict stored with a checkpoint (default: the latest)."""
        self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._info(step)["metadata"]

    def _info(self, step: int) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
        ).data

    def _check_target(self, step: int, abstract: PyTree) -> None:
        where = os.path.join(self.directory, str(step))
        saved = self._manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        on_disk = {_leaf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
        wanted = {_leaf_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        missing, extra = sorted(wanted.keys() - on_disk.keys()), sorted(on_disk.keys() - wanted)
        if missing or extra:
            raise ValueError(
                f"checkpoint {where} does not match the target structure: leaves missing "
                f"from the checkpoint {missing[:5]}, leaves not in the target {extra[:5]}"
            )
        for name, a in wanted.items():
            m = on_disk[name]
            if not hasattr(a, "shape") or jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                continue  # Python scalars and typed PRNG keys are stored in another form
            if tuple(m.shape) != tuple(a.shape) or np.dtype(m.dtype) != np.dtype(a.dtype):
                raise ValueError(
                    f"checkpoint {where}: leaf {name!r} is {np.dtype(m.dtype)}{tuple(m.shape)} "
                    f"on disk but {np.dtype(a.dtype)}{tuple(a.shape)} in the target"
                )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending (half-written saves are excluded)."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until a pending asynchronous save is on disk.

        Raises:
          OSError: the pending save failed (e.g. the disk filled up); as from :meth:`save`.
        """
        pending = [s for s in os.listdir(self.directory) if "tmp" in s]
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            steps = [int(n.split(".")[0]) for n in pending if n.split(".")[0].isdigit()]
            raise self._write_failed(max(steps, default=-1), e) from e

    def close(self) -> None:
        """Finishes pending saves and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
