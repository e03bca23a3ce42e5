"""One process of the multi-process training test (started by test_train_distributed.py).

Usage: ``python tests/_mp_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT_DIR``.
Each process joins the job on 127.0.0.1:PORT, trains the experiments below on a mesh over
all processes' devices feeding only its own rows of every batch, and writes the final
parameters, prune masks and model collections to ``OUT_DIR/process_<id>.npz``. The test
runs :func:`run_experiments` in a single process with all devices as the reference.
"""

from __future__ import annotations

import itertools
import sys

STEPS = 8
GLOBAL_BATCH = 64


def experiments():
    """``name -> (model, tx, image_inputs)``: a plain MLP and a BatchNorm CNN, both pruned."""
    import optax

    from jaxopt_lab.prune import magnitude_mask, polynomial_schedule, prune
    from jaxopt_lab.train import MLP, TeacherCNN

    def tx():
        schedule = polynomial_schedule(0.0, 0.8, 0, 6)
        return optax.chain(optax.adam(1e-2), prune(magnitude_mask, schedule))

    return {
        "mlp": (MLP(hidden=(32,)), tx(), False),
        "cnn": (TeacherCNN(features=(4, 8, 8), hidden=16), tx(), True),
    }


def flat(prefix: str, tree) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}


def run_experiments(mesh) -> dict:
    """Trains every experiment on ``mesh``; returns flat ``{name/kind[path]: array}``."""
    from jaxopt_lab.train import batches, create_train_state, load_digits
    from jaxopt_lab.train import distributed as dist

    out = {}
    for name, (model, tx, image) in experiments().items():
        data = load_digits(seed=0, image=image)
        step, put_state, put_batch = dist.distributed_train_step(model, tx, mesh)
        rows = dist.process_rows(mesh, GLOBAL_BATCH)
        state = put_state(create_train_state(model, tx, data.train.x, seed=0))
        stream = batches(data.train, GLOBAL_BATCH, seed=0, epoch=0)
        for x, y in itertools.islice(stream, STEPS):
            state, metrics = step(state, *put_batch(x[rows], y[rows]))
        host = dist.to_host(state)
        out.update(flat(f"{name}/params", host.params))
        out.update(flat(f"{name}/masks", host.opt_state[1].masks))
        out.update(flat(f"{name}/model_state", host.model_state))
        out[f"{name}/step"] = host.step
        out[f"{name}/loss"] = dist.to_host(metrics["loss"])
    return out


def main(argv: list[str]) -> None:
    process_id, num_processes, port, local_devices = map(int, argv[:4])
    out_dir = argv[4]
    from jaxopt_lab.train import distributed as dist

    dist.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                    local_device_count=local_devices, initialization_timeout=60)
    import jax
    import numpy as np

    if jax.process_count() != num_processes or jax.device_count() != num_processes * local_devices:
        raise SystemExit(f"bad topology: {jax.process_count()} processes, {jax.devices()}")
    results = run_experiments(dist.global_mesh())
    results["devices"] = np.array([jax.device_count(), jax.local_device_count()])
    np.savez(f"{out_dir}/process_{process_id}.npz", **results)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
