"""One process of the process-death test (started by test_train_process_death.py).

Usage: ``python tests/_mp_resumable_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES
WORK_DIR CKPT_DIR HEARTBEAT_S``.

Every process joins the job on 127.0.0.1:PORT with a short heartbeat timeout and runs
:func:`~jaxopt_lab.train.train_resumable` data-parallel over all processes' devices,
checkpointing to CKPT_DIR every :data:`SAVE_EVERY` steps; at the end each writes its
final params to ``WORK_DIR/<CKPT_DIR name>_process_<id>.npz``.
"""

from __future__ import annotations

import os
import sys

STEPS = 40
SAVE_EVERY = 2
BATCH = 64


def main(argv: list[str]) -> None:
    process_id, num_processes, port, local_devices = map(int, argv[:4])
    work, ckpt_dir, heartbeat = argv[4], argv[5], int(argv[6])
    from jaxopt_lab.train import distributed as dist

    dist.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                    local_device_count=local_devices, initialization_timeout=60,
                    heartbeat_timeout=heartbeat, shutdown_timeout=30)
    import jax
    import numpy as np
    import optax

    from jaxopt_lab import app as A
    from jaxopt_lab import train as T

    data = A.load_digits(seed=0, image=False)
    state = T.train_resumable(A.MLP(hidden=(32,)), data, optax.adam(1e-2), steps=STEPS,
                              ckpt_dir=ckpt_dir, save_every=SAVE_EVERY, batch_size=BATCH,
                              mesh=dist.global_mesh(), max_to_keep=None)
    params = jax.tree_util.tree_flatten_with_path(dist.to_host(state.params))[0]
    name = os.path.basename(ckpt_dir)
    np.savez(f"{work}/{name}_process_{process_id}.npz",
             **{jax.tree_util.keystr(p): np.asarray(v) for p, v in params})
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
