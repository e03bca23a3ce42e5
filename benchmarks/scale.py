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

``--processes 2`` runs the same on 2 processes x 4 host devices joined by
``jax.distributed`` on localhost (gloo collectives over loopback): one global mesh of 8
devices, each process holding and measuring its own half (figures per process; the bound
is then half the result + 2 x largest leaf).

``--smoke`` runs the same path on one tiny block of leaves (1/16 of the size per axis,
~0.4 MB) in the layout ``--processes`` names (one child for all ops with one process), and
writes its JSON to ``--out-dir`` or a temporary folder, never to ``benchmarks/results/``.
``tests/test_benchmarks.py`` runs it with one process only: two processes add a
``jax.distributed`` start-up per op (over 5 minutes on the loaded 2-core CPU, against 20 s
allowed).

Prints JSON and writes ``benchmarks/results/scale.json`` (``scale_<gb>gb.json`` for
another ``--gb``, ``scale_2proc*.json`` for two processes).
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
SMOKE_DIV = 16  # --smoke: every axis 16x smaller
SMOKE_GB = 0.0001  # --smoke: one block of BLOCK's leaves (~0.4 MB at SMOKE_DIV)


def leaf_shapes(total_bytes: int, div: int = 1) -> list[tuple[int, ...]]:
    shapes, used = [], 0
    while used < total_bytes:
        for s in BLOCK:
            s = tuple(d // div for d in s)
            shapes.append(s)
            used += 4 * math.prod(s)
    return shapes


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def init_process(processes: int, rank: int, port: int) -> None:
    """Makes this process one of ``processes`` sharing the ``DEVICES`` host devices.

    Call it before JAX is imported: it sets this process's device count (``DEVICES //
    processes``) and, for more than one process, joins the JAX job whose coordinator
    (rank 0) listens on ``127.0.0.1:port``, with gloo collectives.
    """
    local = DEVICES // processes
    # The device count is this script's; a codegen level the caller set (the smoke test's
    # -O0) is kept.
    codegen = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if f.startswith("--xla_backend_optimization_level=")]
    os.environ["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={local}",
                                        *codegen])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if processes > 1:
        from jaxopt_lab.train import distributed as dist

        dist.initialize(f"127.0.0.1:{port}", processes, rank, local_device_count=local,
                        heartbeat_timeout=60)


def child(op: str, gb: float, *, div: int = 1, processes: int = 1, rank: int = 0,
          port: int = 0) -> dict:
    init_process(processes, rank, port)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxopt_lab as jol

    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("x",))  # global: every process's devices
    shapes = leaf_shapes(int(gb * 2**30), div)

    def spec(i, shape):  # alternate the sharded axis so both layouts are exercised
        if len(shape) == 1:
            return P("x")
        return P("x", None) if i % 2 == 0 else P(None, "x")

    shardings = [NamedSharding(mesh, spec(i, s)) for i, s in enumerate(shapes)]
    tree, makers = {}, {}
    for i, (s, sh) in enumerate(zip(shapes, shardings)):
        # one compiled maker per (shape, layout), not per leaf: leaves repeat BLOCK's shapes
        make = makers.setdefault((s, sh.spec), jax.jit(
            lambda k, s=s: jax.random.normal(k, s, jnp.float32), out_shardings=sh))
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
    # Compiled ahead, and the compiled program is what runs: the peak below is the
    # operation's memory, not the compiler's (a jitted call would compile again inside
    # the measured window).
    fn = jax.jit(fns[op]).lower(args).compile()
    hlo = fn.as_text()
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
    largest = 4 * math.prod(d // div for d in LARGEST)
    bound = result_bytes // processes + 2 * largest  # this process's share of the result
    return {
        "op": op, "process": rank, "processes": processes, "leaves": len(shapes),
        "input_bytes": input_bytes,
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], processes: int, *, timeout: float = 3600.0,
           env: dict[str, str] | None = None) -> list[dict]:
    """Runs ``python *argv --processes N --rank R --port P`` once per rank, as one job.

    The script calls `init_process` with those three and prints one ``RESULT <json>``
    line. Once a process fails (or ``timeout`` seconds pass) the others are killed:
    they would wait in a collective for the dead one until the heartbeat timeout.

    Returns:
      One row per rank: its RESULT object, or ``{"process": rank, "returncode": code,
      "error": the output's tail, "result": the RESULT object printed before, or None}``.
    """
    import tempfile

    cmd = [sys.executable, *argv, "--processes", str(processes), "--port", str(_free_port())]
    logs = [tempfile.TemporaryFile() for _ in range(processes)]
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=log, stderr=subprocess.STDOUT,
                              env=env) for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # only this job's own children, by handle
            if p.poll() is None:
                p.kill()
            p.wait()
    rows = []
    for r, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        out = log.read().decode(errors="replace")
        log.close()
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"process": r, "returncode": proc.returncode, "error": out[-2000:],
                         "result": json.loads(line[0][7:]) if line else None})
        else:
            rows.append(json.loads(line[0][7:]))
    return rows


def _run_op(op: str, gb: float, div: int, processes: int) -> list[dict]:
    """One child per process for ``op`` (or for several comma-separated ops, run one after
    another in the same child); a row per op and process (or one error row per process)."""
    out = []
    for row in launch([__file__, "--child", op, "--gb", str(gb), "--div", str(div)],
                      processes):
        out.extend(row if isinstance(row, list) else [{"op": op, **row}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=None, help="tree size (default 2.0)")
    parser.add_argument("--ops", default="q8,q4,deq,mask")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny block of leaves; JSON to --out-dir or a temporary "
                             "folder, never to benchmarks/results/")
    parser.add_argument("--out-dir", default=None,
                        help="folder for the JSON (default: benchmarks/results/, or a new "
                             "temporary folder with --smoke)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--div", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args()
    gb = a.gb if a.gb is not None else (SMOKE_GB if a.smoke else 2.0)
    if a.child:  # one RESULT line: the rows of every op, in order
        print("RESULT " + json.dumps([child(op, gb, div=a.div, processes=a.processes,
                                            rank=a.rank, port=a.port)
                                      for op in a.child.split(",")]), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _util import emit, output_dir

    div = SMOKE_DIV if a.smoke else 1
    rows = []
    # --smoke on one process: every op in a single child (one JAX start-up instead of four;
    # its memory figures mean nothing at this size anyway). Otherwise a fresh child per op.
    groups = [a.ops] if a.smoke and a.processes == 1 else a.ops.split(",")
    for group in groups:
        for row in _run_op(group, gb, div, a.processes):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    name = "scale" if a.processes == 1 else "scale_2proc"
    if a.smoke:
        name = "scale"  # a smoke run writes its own folder only (emit refuses results/)
    elif gb != 2.0:
        name += f"_{gb:g}gb"
    errors = [r for r in rows if "error" in r]
    emit(name, {"tree_gb": gb, "devices": DEVICES, "processes": a.processes,
                "results": rows, "errors": len(errors),
                "note": "one timed run per op on 2 shared CPU cores; peak RSS from VmHWM "
                        "reset after the input is built; with 2 processes every figure is "
                        "one process's (its half of the devices)"},
         out_dir=output_dir(a), smoke=a.smoke)
    if errors:
        sys.exit(f"{len(errors)} benchmark child(ren) failed")


if __name__ == "__main__":
    main()
