"""Samples/s of the digits teacher's train step: jit, pmap (8 devices), mesh-sharded jit.

Run: python benchmarks/train_throughput.py  (forces 8 host CPU devices unless XLA_FLAGS
already sets a device count). Prints JSON with medians and ratios to the jit baseline.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import sys  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import emit, median_seconds  # noqa: E402

from jaxopt_lab import train as T  # noqa: E402


def main(global_batch: int = 256, repeats: int = 15) -> None:
    data = T.load_digits()
    n = jax.device_count()
    x, y = data.train.x[:global_batch], data.train.y[:global_batch]
    model, tx = T.TeacherCNN(), optax.adam(1e-3)
    s0 = T.create_train_state(model, tx, data.train.x)

    jit_step = T.jit_train_step(model, tx)
    pmap_step = T.pmap_train_step(model.clone(axis_name="batch"), tx)
    mesh_step, put_state, put_batch = T.mesh_train_step(model, tx, T.data_mesh(n))
    px, py = T.shard_batch_for_pmap(x, n), T.shard_batch_for_pmap(y, n)
    mx, my = put_batch(x, y)
    rep, ms = T.replicate(s0), put_state(s0)

    # Each timed call continues from a fixed state, so every run does identical work.
    timings = {
        "jit_1_device": median_seconds(lambda: jit_step(s0, x, y), repeats=repeats),
        f"pmap_{n}_devices": median_seconds(lambda: pmap_step(rep, px, py), repeats=repeats),
        f"mesh_jit_{n}_devices": median_seconds(lambda: mesh_step(ms, mx, my), repeats=repeats),
    }
    base = timings["jit_1_device"]
    emit("train_throughput", {
        "model": "TeacherCNN", "global_batch": global_batch, "repeats": repeats,
        "median_step_seconds": timings,
        "samples_per_second": {k: global_batch / v for k, v in timings.items()},
        "throughput_ratio_to_jit": {k: base / v for k, v in timings.items()},
        "note": "host CPU devices share the machine's cores, so multi-device ratios on CPU "
                "measure overhead, not scaling",
    })


if __name__ == "__main__":
    main()
