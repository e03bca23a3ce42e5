"""One process of the multi-process training test (started by test_train_distributed.py).

Usage: ``python tests/_mp_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES WORK_DIR``.

The test writes ``WORK_DIR/data.npz`` (the training split) and an orbax checkpoint of the
initial state in ``WORK_DIR/init``. Every process joins the job on 127.0.0.1:PORT,
restores the initial state replicated over a mesh spanning all processes' devices, trains
:data:`STEPS` data-parallel steps of :func:`experiment` feeding only its own rows of each
global batch, then writes the final state twice: together, as one orbax checkpoint in
``WORK_DIR/final`` (a multi-process save), and each on its own, as flat arrays in
``WORK_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import itertools
import sys

STEPS = 8
GLOBAL_BATCH = 64


def experiment():
    """``(model, tx)``: a digits MLP under Adam with gradual magnitude pruning to 80%."""
    import optax

    from jaxopt_lab.pruning import magnitude_mask, polynomial_schedule, prune
    from jaxopt_lab.app import MLP

    tx = optax.chain(
        optax.adam(1e-2), prune(magnitude_mask, polynomial_schedule(0.0, 0.8, 0, 6))
    )
    return MLP(hidden=(32,)), tx


def flat(state) -> dict:
    """``{"params['Dense_0']['kernel']": array, ...}`` for params, masks, step and key."""
    import jax
    import numpy as np

    parts = {"params": state.params, "masks": state.opt_state[1].masks,
             "step": state.step, "rng": state.rng}
    leaves = jax.tree_util.tree_flatten_with_path(parts)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def main(argv: list[str]) -> None:
    process_id, num_processes, port, local_devices = map(int, argv[:4])
    work = argv[4]
    from jaxopt_lab.train import distributed as dist

    dist.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                    local_device_count=local_devices, initialization_timeout=60)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxopt_lab.train import Split, batches, create_train_state
    from jaxopt_lab.train.checkpoint import Checkpointer

    if jax.process_count() != num_processes or jax.local_device_count() != local_devices:
        raise SystemExit(f"unexpected topology: {jax.process_count()} processes, {jax.devices()}")
    with np.load(f"{work}/data.npz") as z:
        split = Split(z["x"], z["y"])
    model, tx = experiment()
    mesh = dist.global_mesh()
    # Restore the test's initial state straight onto the global mesh: the target is
    # abstract (no model.init here) and carries the replicated sharding.
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, split.x[:1], seed=0))
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    with Checkpointer(f"{work}/init") as ckpt:
        state, _ = ckpt.restore(target)

    step, _, put_batch = dist.distributed_train_step(model, tx, mesh)
    rows = dist.process_rows(mesh, GLOBAL_BATCH)
    for x, y in itertools.islice(batches(split, GLOBAL_BATCH, seed=0, epoch=0), STEPS):
        state, _ = step(state, *put_batch(x[rows], y[rows]))

    with Checkpointer(f"{work}/final") as ckpt:
        ckpt.save(STEPS, state)
    np.savez(f"{work}/process_{process_id}.npz", **flat(dist.to_host(state)))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
