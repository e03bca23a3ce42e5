"""Scale benchmark: int8/int4 quantization, dequantization and 50% global magnitude masks
of a large float32 tree sharded with ``NamedSharding`` over 8 host devices.

Run: ``python benchmarks/scale.py [--gb 2.0] [--ops q8,q4,deq,mask]``. Each operation runs
in a fresh child process (so one's memory high-water mark can't hide another's) that
builds the tree directly on the devices (no host copy), resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), runs the jitted operation twice (compile + run, then
a timed run) and reports:

* ``peak_over_input_bytes``: ``VmHWM`` during the operation minus RSS before it, against
  the bound ``result + 2 x largest leaf`` (host devices live in this process's memory, so
  RSS is device memory too; the input is resident before the reset);
* ``seconds_per_gb``: the timed run's wall time per GB of input (2 shared CPU cores: one
  run, noisy);
* ``all_gathers`` in the compiled HLO, the largest gathered shape, and whether every output
  leaf has its input's sharding.

Prints JSON and writes ``benchmarks/results/scale.json`` (``scale_<gb>gb.json`` for
another ``--gb``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

DEVICES = 8
LARGEST = (4096, 4096)  # 64 MB of float32
# A transformer-like block: attention/MLP kernels, embeddings-sized and small leaves.
BLOCK = [(4096, 4096), (4096, 1024), (1024, 4096), (1024, 1024), (1024, 1024), (4096,),
         (1024,), (1024,)]


def leaf_shapes(total_bytes: int) -> list[tuple[int, ...]]:
    shapes, used = [], 0
    while used < total_bytes:
        for s in BLOCK:
            shapes.append(s)
            used += 4 * math.prod(s)
    return shapes


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(op: str, gb: float) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxopt_lab as jol

    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("x",))
    shapes = leaf_shapes(int(gb * 2**30))

    def spec(i, shape):  # alternate the sharded axis so both layouts are exercised
        if len(shape) == 1:
            return P("x")
        return P("x", None) if i % 2 == 0 else P(None, "x")

    shardings = [NamedSharding(mesh, spec(i, s)) for i, s in enumerate(shapes)]
    tree = {}
    for i, (s, sh) in enumerate(zip(shapes, shardings)):
        make = jax.jit(lambda k, s=s: jax.random.normal(k, s, jnp.float32), out_shardings=sh)
        tree[f"leaf_{i:03d}"] = make(jax.random.key(i))
    jax.block_until_ready(tree)
    fns = {
        "q8": lambda t: jol.quantize(t, bits=8),
        "q4": lambda t: jol.quantize(t, bits=4),
        "deq": jol.dequantize,
        "mask": lambda t: jol.magnitude_mask(t, 0.5, scope="global"),
    }
    args = tree
    if op == "deq":
        args = jax.block_until_ready(jax.jit(fns["q8"])(tree))
        del tree
    fn = jax.jit(fns[op])
    hlo = fn.lower(args).compile().as_text()
    gathers = re.findall(r"= (\w+\[[\d,]*\])[^=]* all-gather\(", hlo)
    input_bytes = jol.tree_nbytes(args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status("VmRSS")
    out = jax.block_until_ready(fn(args))
    result_bytes = jol.tree_nbytes(out)
    del out
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(args))
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - before

    def storage(x):  # a QTensor's int storage carries its sharding
        return x.qvalue if hasattr(x, "qvalue") else x

    source = args
    if op == "deq":
        source = {k: storage(v) for k, v in args.items()}
    mismatched = [k for k, v in out.items()
                  if storage(v).sharding.spec != storage(source[k]).sharding.spec]
    sharded_like_input = not mismatched
    largest = 4 * math.prod(LARGEST)
    bound = result_bytes + 2 * largest
    return {
        "op": op, "leaves": len(shapes), "input_bytes": input_bytes,
        "result_bytes": result_bytes, "largest_leaf_bytes": largest,
        "peak_over_input_bytes": peak, "bound_bytes": bound, "within_bound": peak <= bound,
        "seconds": seconds,
        # per GB of float32 data (the input, or dequantize's output)
        "seconds_per_gb": seconds / (max(input_bytes, result_bytes) / 2**30),
        "all_gathers": len(gathers),
        "largest_gather": max(gathers, key=lambda g: math.prod(
            int(d) for d in re.findall(r"\d+", g.split("[")[1]) or [1]), default=None),
        "outputs_sharded_like_inputs": bool(sharded_like_input),
        "mismatched_output_shardings": [
            f"{k}: {storage(source[k]).sharding.spec} -> {storage(out[k]).sharding.spec}"
            for k in mismatched[:4]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--ops", default="q8,q4,deq,mask")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.gb)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _util import emit

    rows = []
    for op in a.ops.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", op, "--gb", str(a.gb)],
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"op": op, "error": (proc.stderr or proc.stdout)[-2000:]})
        else:
            rows.append(json.loads(line[0][7:]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    emit("scale" if a.gb == 2.0 else f"scale_{a.gb:g}gb", {"tree_gb": a.gb, "devices": DEVICES, "processes": 1, "results": rows,
                   "note": "one timed run per op on 2 shared CPU cores; peak RSS from VmHWM "
                           "reset after the input is built"})


if __name__ == "__main__":
    main()
