"""One process of the two-process sharded-artifact test (tests/test_io_sharded_processes.py).

Started through ``benchmarks/scale.py``'s launcher, as ``python _mp_sharded_io_worker.py
DIRECTORY --seed S [--killed-resave] --processes 2 --port P --rank R``, it

1. builds the test tree (from ``S``) sharded over all processes' devices, saves it with
   `jaxopt_lab.save_sharded`, loads it back on the same processes and prints ``RESULT``
   with whether every local shard came back bit for bit, and a digest of each leaf's
   global value;
2. with ``--killed-resave``, saves the tree of seed ``S + 1`` into the same directory, and
   process 0 SIGKILLs itself just before it would write the index (every process's shard
   file is written by then). One job does both: starting two JAX processes costs more
   than everything else here.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402  (its launcher and process setup)


def build_tree(seed: int):
    """A small tree over every process's devices: float32/bfloat16 leaves sharded along
    each axis, int8 and packed int4 QTensors, an N:M mask, replicated and host leaves."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxopt_lab as jol

    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(seed)

    def put(x, spec):  # each process supplies only its own devices' slices
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                            lambda idx: x[idx])

    w = put(rng.normal(size=(32, 16)).astype(np.float32), P("x", None))
    v = put(rng.normal(size=(16, 24)).astype(jnp.bfloat16), P(None, "x"))
    derived = jax.jit(lambda w, v: {
        "q8": jol.quantize({"w": w}, bits=8)["w"],
        "q4": jol.quantize({"v": v.astype(jnp.float32)}, bits=4)["v"],
        "mask": jol.nm_mask({"w": w}, n=2, m=4)["w"],
    })(w, v)
    return {"w": w, "v": v, **derived,
            "rep": put(rng.normal(size=(8,)).astype(np.float32), P()),
            "host": np.arange(5, dtype=np.int16), "step": seed}


def digests(tree) -> dict[str, str]:
    """sha256 of each leaf's global value (with dtype and shape); small test leaves only."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.asarray(x)
        out[jax.tree_util.keystr(path)] = hashlib.sha256(
            f"{x.dtype}{x.shape}".encode() + x.tobytes()).hexdigest()
    return out


def same_local_shards(a, b) -> bool:
    """Same structure, and every leaf's local shards equal bit for bit, placed alike."""
    import jax
    import numpy as np

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array):
            if not isinstance(y, jax.Array) or x.sharding.spec != y.sharding.spec:
                return False
            xs = sorted((s.device.id, s.index, np.asarray(s.data).tobytes())
                        for s in x.addressable_shards)
            ys = sorted((s.device.id, s.index, np.asarray(s.data).tobytes())
                        for s in y.addressable_shards)
            if [(d, str(i), r) for d, i, r in xs] != [(d, str(i), r) for d, i, r in ys]:
                return False
        elif np.asarray(x).tobytes() != np.asarray(y).tobytes() or type(x) is not type(y):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--killed-resave", action="store_true")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    a = parser.parse_args()
    scale.init_process(a.processes, a.rank, a.port)
    import jax

    import jaxopt_lab as jol
    from jaxopt_lab import io as jol_io

    tree = build_tree(a.seed)
    jol.save_sharded(a.directory, tree, metadata={"seed": a.seed})
    back, meta = jol.load_sharded(a.directory, with_metadata=True)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "metadata": meta,
        "same_process_load_exact": same_local_shards(tree, back),
        "digests": digests(tree), "loaded_digests": digests(back),
    }), flush=True)
    if a.killed_resave:
        write_atomic = jol_io.write_atomic

        def dies_before_the_index(path, raw):
            if os.path.basename(path) == "index.json":
                os.kill(os.getpid(), signal.SIGKILL)
            write_atomic(path, raw)

        jol_io.write_atomic = dies_before_the_index
        jol.save_sharded(a.directory, build_tree(a.seed + 1), metadata={"seed": a.seed + 1})
        print("the killed save returned", flush=True)


if __name__ == "__main__":
    main()
