"""Data-parallel training across several processes with JAX's own distributed runtime.

Every process runs the same program (multi-controller JAX). After :func:`initialize`,
``jax.devices()`` lists the devices of *all* processes; a mesh over them makes one
``jit``-ed train step span the whole job, and XLA inserts the cross-process gradient
all-reduce (gloo on CPU, NCCL on GPU, ICI/DCN on TPU). Each process loads only its own
rows of the global batch (:func:`process_rows`) and :func:`distributed_train_step`'s
``put_batch`` assembles them into one globally sharded array.

On a single machine this runs for real with host CPU devices, e.g. two processes with
four devices each behave like one process with eight (see ``tests/test_train_distributed.py``).

Examples:
  >>> # In every process (process_id 0 and 1), before any other JAX call:
  >>> jol.train.distributed.initialize("10.0.0.1:1234", 2, process_id)  # doctest: +SKIP
  >>> mesh = jol.train.global_mesh()  # doctest: +SKIP
  >>> step, put_state, put_batch = jol.train.distributed_train_step(
  ...     model, tx, mesh)  # doctest: +SKIP
  >>> rows = jol.train.process_rows(mesh, 64)  # doctest: +SKIP
  >>> state, metrics = step(put_state(state), *put_batch(x[rows], y[rows]))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.train.step import mesh_train_step

PyTree = Any
_initialized = False  # set by initialize(): CPU collectives now go through gloo


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 300,
) -> None:
    """Joins this process to a multi-process JAX job; call it before any other JAX call.

    Args:
      coordinator_address: ``"host:port"`` of process 0, where the coordinator listens.
        Leave all three of ``coordinator_address``, ``num_processes`` and ``process_id``
        as ``None`` on Cloud TPU, SLURM or Open MPI: JAX then reads them from the
        environment (``JAX_COORDINATOR_ADDRESS`` also works anywhere).
      num_processes: total number of processes in the job.
      process_id: this process's rank, ``0 <= process_id < num_processes``.
      local_device_count: number of host CPU devices this process exposes (CPU only; the
        same as ``--xla_force_host_platform_device_count``). ``None`` keeps the default.
      cpu_collectives: cross-process collectives on CPU, ``"gloo"`` (bundled with jaxlib)
        or ``"mpi"``. Without them a CPU computation spanning processes fails to run.
      initialization_timeout: seconds to wait for all processes to connect.
      heartbeat_timeout: seconds after which a process that sent no heartbeat counts as
        dead. Then every other process is stopped with an error naming the missing task
        ("heartbeat timeout" from JAX's coordination service) instead of waiting forever
        in a collective or barrier: a SIGKILLed peer ends the job within about this time.
      shutdown_timeout: seconds :func:`shutdown` waits at its barrier for the others.

    Raises:
      ValueError: a malformed address, ``num_processes < 1`` or ``process_id`` out of range,
        or a timeout below 1 second.
    """
    for name, value in (("initialization_timeout", initialization_timeout),
                        ("heartbeat_timeout", heartbeat_timeout),
                        ("shutdown_timeout", shutdown_timeout)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
    if coordinator_address is not None:
        host, sep, port = coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"coordinator_address must be 'host:port', got {coordinator_address!r}"
            )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if cpu_collectives not in ("gloo", "mpi"):
        raise ValueError(f"cpu_collectives must be 'gloo' or 'mpi', got {cpu_collectives!r}")
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", local_device_count)
    # gloo is jax 0.10's default, but set it explicitly: older releases defaulted to none,
    # and then every cross-process CPU collective fails at run time.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    global _initialized
    _initialized = True


def shutdown() -> None:
    """Leaves the distributed job (waits for the other processes at a barrier)."""
    global _initialized
    jax.distributed.shutdown()
    _initialized = False


def global_mesh(axis: str = "data") -> Mesh:
    """A 1-D mesh over every device of every process, ordered process by process.

    Process-major order makes each process's share of a batch one contiguous block of rows.

    Examples:
      >>> import jaxopt_lab as jol
      >>> mesh = jol.train.global_mesh()
      >>> mesh.axis_names, mesh.size == jax.device_count()
      (('data',), True)
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (axis,))


def process_rows(mesh: Mesh, global_batch_size: int, *, data_axis: str = "data") -> slice:
    """The rows of a global batch that this process must load (a contiguous slice).

    Raises:
      ValueError: the batch does not split evenly over the mesh, or this process's devices
        do not hold one contiguous block of rows (use :func:`global_mesh`).

    Examples:
      >>> import jaxopt_lab as jol
      >>> mesh = jol.train.global_mesh()
      >>> rows = jol.train.process_rows(mesh, 8 * mesh.size)  # a single process owns all rows
      >>> (rows.start, rows.stop) == (0, 8 * mesh.size)
      True
    """
    n = mesh.shape[data_axis]
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by {n} mesh devices"
        )
    sharding = NamedSharding(mesh, P(data_axis))
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    per_device = global_batch_size // n
    lo, hi = starts[0], starts[-1] + per_device
    if (hi - lo) != per_device * len(starts):
        raise ValueError(
            f"process {jax.process_index()} owns non-contiguous rows {starts} of the batch; "
            "order the mesh devices by process (see global_mesh)"
        )
    return slice(lo, hi)


def put_replicated(mesh: Mesh, tree: PyTree) -> PyTree:
    """Places a host tree, identical in every process, replicated over a global mesh.

    Each process fills its own devices from its local copy; nothing crosses processes.
    (``jax.device_put`` would instead compare the copies across processes, an extra
    round trip per leaf that also rejects legitimate NaN entries, e.g. a prune state's
    "no sparsity yet" marker.)
    """
    sharding = NamedSharding(mesh, P())

    def put(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(a)
            return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=impl)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)


def put_process_batch(mesh: Mesh, tree: PyTree, *, data_axis: str = "data") -> PyTree:
    """Assembles each process's rows (leading axis) into global arrays sharded on ``data_axis``.

    Raises:
      ValueError: a leaf's row count does not split over this process's devices.
    """
    sharding = NamedSharding(mesh, P(data_axis))
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    scale = mesh.shape[data_axis] // max(local, 1)

    def put(path, a):
        a = np.asarray(a)
        if a.ndim == 0 or a.shape[0] % max(local, 1):
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path) or '<root>'} with shape {a.shape}: "
                f"rows must split over this process's {local} devices"
            )
        global_shape = (a.shape[0] * scale, *a.shape[1:])
        return jax.make_array_from_process_local_data(sharding, a, global_shape)

    return jax.tree_util.tree_map_with_path(put, tree)


def to_host(tree: PyTree) -> PyTree:
    """Gathers global arrays into full NumPy arrays on every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def distributed_train_step(
    model, tx: optax.GradientTransformation, mesh: Mesh, *, data_axis: str = "data", **kwargs
) -> tuple[Callable, Callable, Callable]:
    """:func:`~jaxopt_lab.train.mesh_train_step` for a mesh spanning several processes.

    Returns ``(step, put_state, put_batch)``: the jitted step, a function placing a host
    state (the same in every process) replicated on the mesh, and ``put_batch(x, y)``
    taking only *this process's* rows (see :func:`process_rows`) and returning global
    batch arrays. With one process this computes exactly what :func:`mesh_train_step` does.

    On CPU, once the distributed runtime is up, ``step`` waits for each step to finish
    before returning: with jax 0.10, several steps in flight at once (JAX's asynchronous
    dispatch) can deadlock in the gloo all-reduce, in one process or several. GPU and TPU
    steps stay asynchronous.
    """
    jitted, _, _ = mesh_train_step(model, tx, mesh, data_axis=data_axis, **kwargs)
    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def step(state, x, y):
        out = jitted(state, x, y)
        if on_cpu and (_initialized or jax.process_count() > 1):
            jax.block_until_ready(out)
        return out

    def put_state(state):
        return put_replicated(mesh, state)

    def put_batch(x, y):
        return put_process_batch(mesh, (x, y), data_axis=data_axis)

    return step, put_state, put_batch
