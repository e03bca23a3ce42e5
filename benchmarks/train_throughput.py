"""Samples/s of the digits teacher's train step: jit, pmap (8 devices), mesh-sharded jit.

Run: ``python benchmarks/train_throughput.py [--repeats N] [--smoke]`` (forces 8 host CPU
devices unless XLA_FLAGS already sets a device count). The three steps are timed interleaved
in one process (order reversed every other round); prints JSON with the median step times
and each step's throughput relative to jit as the median of per-round ratios (jit time /
step time) with its spread, and writes ``benchmarks/results/train_throughput.json``
(``--smoke``: batch 32, 3 rounds, JSON to a temporary folder).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import (  # noqa: E402
    add_common_args,
    emit,
    interleaved_seconds,
    output_dir,
    paired_ratio,
)

from jaxopt_lab import app as A  # noqa: E402
from jaxopt_lab import train as T  # noqa: E402


def measure(global_batch: int, repeats: int) -> dict:
    data = A.load_digits()
    n = jax.device_count()
    x, y = data.train.x[:global_batch], data.train.y[:global_batch]
    model, tx = A.TeacherCNN(), optax.adam(1e-3)
    s0 = T.create_train_state(model, tx, data.train.x)

    jit_step = T.jit_train_step(model, tx)
    pmap_step = T.pmap_train_step(model.clone(axis_name="batch"), tx)
    mesh_step, put_state, put_batch = T.mesh_train_step(model, tx, T.data_mesh(n))
    px, py = T.shard_batch_for_pmap(x, n), T.shard_batch_for_pmap(y, n)
    mx, my = put_batch(x, y)
    rep, ms = T.replicate(s0), put_state(s0)

    # Each timed call continues from a fixed state, so every run does identical work.
    rounds = interleaved_seconds({
        "jit_1_device": lambda: jit_step(s0, x, y),
        f"pmap_{n}_devices": lambda: pmap_step(rep, px, py),
        f"mesh_jit_{n}_devices": lambda: mesh_step(ms, mx, my),
    }, repeats=repeats)
    timings = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "model": "TeacherCNN", "global_batch": global_batch, "repeats": repeats,
        "median_step_seconds": timings,
        "samples_per_second": {k: global_batch / v for k, v in timings.items()},
        # jit time / step time per round: > 1 means more samples/s than the jit step.
        "throughput_ratio_to_jit": {k: paired_ratio(rounds["jit_1_device"], v)
                                    for k, v in rounds.items() if k != "jit_1_device"},
        "note": "host CPU devices share the machine's cores, so multi-device ratios on CPU "
                "measure overhead, not scaling",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    args = add_common_args(parser).parse_args()
    batch, repeats = (32, 3) if args.smoke else (args.global_batch, args.repeats)
    emit("train_throughput", measure(batch, repeats), out_dir=output_dir(args),
         smoke=args.smoke)


if __name__ == "__main__":
    main()
