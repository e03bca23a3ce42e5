"""Quantization benchmark: storage, accuracy and CPU speed, jaxopt_lab next to Qwix.

Everything is measured in this one process on the same weights and inputs:

* storage ratio fp32 / quantized (`jol.tree_nbytes`, packed bytes) for the digits teacher
  and an MLP 1024 -> 4096 -> 1024: int8 per channel and int4 per group of 128;
* digits teacher test accuracy: fp32, int8 PTQ, int4 group PTQ, int4 QAT (fine-tuning with
  `fake_quant` through `fit(param_transform=...)`), and W8A8 (static and dynamic scales);
* forward time of the MLP at batch 1024: fp32, weight-only int8, W8A8 (native VNNI kernel
  and XLA's own int8 dot), interleaved rounds: median wall and process-CPU times, the ratio
  of the medians and the median of the per-round ratios, and the per-call temporary buffer
  XLA allocates (fp32 vs weight-only);
* storage also over the quantized leaves only (next to the whole-tree figures), and for the
  teacher the deployment flow bn_fold -> int8 as its own row;
* the same figures for Qwix (PTQ provider) where its API allows.

* the latency tables of issue 16: the MLP at batch 1, 16 and 1024 for fp32, int8 and int4
  g128 weight-only (`weight_only_matmul`), W8A8 static and dynamic (`int8_dot_general`) and
  Qwix's int8 weight-only, W8A8 dynamic and int4 g128 side by side; at batch 1 the bytes
  each call must read against the measured read bandwidth (the memory-bound floor); and a
  ResNet-18-like conv net (16 base filters, 32x32, batch 16 and 1) through
  `quantized_apply`.

Run: ``python benchmarks/quantization.py [--quick | --smoke]``; prints JSON and writes
``benchmarks/results/quantization.json`` (``quantization_smoke.json`` for ``--smoke``: tiny
sizes, latency tables only). A section that fails is reported as failed and the exit
status is 1. Timings share the machine with whatever else
runs; the ratios come from interleaved rounds, so slow phases hit all variants alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import threading
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab.quant import int8_ops, native
from jaxopt_lab.quant.qtensor import is_qtensor
from jaxopt_lab.quant.weight_only import weight_only_matmul

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import emit  # noqa: E402

GROUP = 128


def int4_where(path, leaf):
    """int4 per group of 128 along the contraction axis where it divides, else per channel."""
    del path
    if jnp.ndim(leaf) < 2:
        return False
    if leaf.shape[-2] % GROUP == 0:
        return {"bits": 4, "granularity": "group", "group_size": GROUP}
    return {"bits": 4, "granularity": "channel"}


def int4_where_bf16(path, leaf):
    choice = int4_where(path, leaf)
    return choice and {**choice, "scale_dtype": "bfloat16"}


def ratio(a: float, b: float) -> float:
    return round(float(a) / float(b), 4)


def quantized_variants(tree) -> dict:
    """The weight formats compared: int8 per channel, int4 per group; fp32 or bf16 scales."""
    return {
        "int8_channel": jol.quantize(tree, bits=8),
        "int8_channel_bf16_scales": jol.quantize(tree, bits=8, scale_dtype="bfloat16"),
        "int4_group128": jol.quantize(tree, where=int4_where),
        "int4_group128_bf16_scales": jol.quantize(tree, where=int4_where_bf16),
    }


STORAGE_SCOPE = (
    "bytes/ratio: the whole tree, unquantized leaves (biases, BatchNorm scale/bias) counted "
    "in fp32; quantized_leaves_only: only the leaves stored as QTensor, against the fp32 "
    "bytes of those same leaves (codes + scales, e.g. int4 g128 = 4 + 32/128 bits a weight)")


def _paths(tree, is_leaf=None) -> dict:
    """``{path string: leaf}`` of a pytree."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def quantized_leaves_only(params, q) -> dict:
    """Storage ratio over the leaves that were quantized only (QTensors vs their fp32)."""
    fp32 = _paths(params)
    quant = {k: v for k, v in _paths(q, is_leaf=is_qtensor).items() if is_qtensor(v)}
    fp32_bytes = sum(jol.tree_nbytes(fp32[k]) for k in quant)
    q_bytes = jol.tree_nbytes(list(quant.values()))
    return {"leaves": len(quant), "fp32_bytes": fp32_bytes, "bytes": q_bytes,
            "ratio": ratio(fp32_bytes, q_bytes)}


def storage(params) -> dict:
    fp32 = jol.tree_nbytes(params)
    out = {"scope": STORAGE_SCOPE, "fp32_bytes": fp32}
    for name, q in quantized_variants(params).items():
        out[name] = {"bytes": jol.tree_nbytes(q), "ratio": ratio(fp32, jol.tree_nbytes(q)),
                     "quantized_leaves_only": quantized_leaves_only(params, q)}
    return out


def bn_fold_deployment(model, variables, x, y) -> dict:
    """The deployment flow bn_fold -> int8 quantize: storage and accuracy.

    ``bn_fold`` leaves each folded BatchNorm as an exact identity plus a shift, and
    ``folded_apply`` reads only that shift: nothing (``shift_in == "layer_bias"``), the BN's
    ``bias`` (``"bn_bias"``) or its ``mean`` (``"bn_mean"``). Only those leaves of a folded
    BatchNorm are shipped; its other leaves (scale, var, ...) are dropped.
    """
    folded, report = jol.bn_fold(model, variables, x[:1], train=False, return_report=True)
    reads = {p.batch_norm: {"layer_bias": (), "bn_bias": ("bias",), "bn_mean": ("mean",)}
             [p.shift_in] for p in report.folded}

    def shipped(tree):
        out = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]:
            names = [str(getattr(k, "key", k)) for k in path]
            bn = "/".join(names[1:-1])
            if bn not in reads or names[-1] in reads[bn]:
                out.append(leaf)
        return out

    q8 = {**folded, "params": jol.quantize(folded["params"], bits=8)}
    infer = jax.jit(lambda v, x: jol.folded_apply(model, jol.dequantize(v), x, report=report,
                                                  train=False))
    fp32_all = jol.tree_nbytes(variables)
    fp32_params = jol.tree_nbytes(variables["params"])
    q_bytes = jol.tree_nbytes(shipped(q8))
    return {
        "flow": ("bn_fold -> quantize(params, bits=8) -> ship only what folded_apply reads "
                 "of each folded BatchNorm (its shift)"),
        "folded_batch_norms": len(report.folded),
        "shift_in": sorted({p.shift_in for p in report.folded}),
        "fp32_variables_bytes": fp32_all,
        "fp32_folded_shipped_bytes": jol.tree_nbytes(shipped(folded)),
        "int8_bytes": q_bytes,
        "ratio_vs_fp32_variables": ratio(fp32_all, q_bytes),
        "ratio_vs_fp32_params": ratio(fp32_params, q_bytes),
        "int8_accuracy": accuracy(lambda x: infer(q8, x), x, y),
    }


def accuracy(fn, x, y) -> float:
    return round(100.0 * float(np.mean(np.argmax(np.asarray(fn(x)), -1) == y)), 2)


def time_interleaved(fns: dict, args: dict, rounds: int, *, inner: int = 1
                     ) -> tuple[dict, dict, dict]:
    """Per variant: median wall seconds, median process CPU seconds and the per-round times.

    One call of every variant per round (compiled first), so a slow phase of the shared
    machine hits all variants of a round alike. CPU time sums all threads of this process;
    it is less sensitive than wall time to other processes competing for the cores.
    """
    for k, f in fns.items():
        jax.block_until_ready(f(*args[k]))
        jax.block_until_ready(f(*args[k]))
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                out = f(*args[k])
            jax.block_until_ready(out)
            wall[k].append((time.perf_counter() - t0) / inner)
            cpu[k].append((time.process_time() - c0) / inner)
    median = lambda d: {k: float(np.median(v)) for k, v in d.items()}  # noqa: E731
    return median(wall), median(cpu), wall


def round_ratios(wall: dict, base: str = "fp32") -> dict:
    """Median over rounds of ``base time / variant time`` measured in the same round."""
    ref = np.asarray(wall[base])
    return {k: round(float(np.median(ref / np.asarray(v))), 4)
            for k, v in wall.items() if k != base}


def temp_bytes(fn, args) -> int | None:
    """Bytes of the per-call temporary buffer XLA allocates for ``fn(*args)``."""
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def rel_err(y, ref) -> float:
    return round(float(jnp.abs(y - ref).max() / jnp.abs(ref).max()), 5)


# --------------------------------------------------------------------------- teacher
def teacher_section(quick: bool) -> dict:
    data = jol.app.load_digits()
    model = jol.app.TeacherCNN()
    epochs, qat_epochs = (3, 1) if quick else (30, 8)
    t0 = time.perf_counter()
    variables, hist = jol.train.fit(model, data, optax.adam(1e-3), epochs=epochs,
                                    batch_size=64, patience=6)
    train_s = time.perf_counter() - t0
    x, y = jnp.asarray(data.test.x), np.asarray(data.test.y)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    fp32 = accuracy(lambda x: apply(variables, x), x, y)

    res = {"fp32_accuracy": fp32, "train_seconds": round(train_s, 1),
           "best_epoch": hist["best_epoch"], "test_examples": int(len(y))}
    ptq = quantized_variants(variables)
    q8 = ptq["int8_channel"]
    res["ptq_accuracy"] = {k: accuracy(lambda x, q=q: apply(jol.dequantize(q), x), x, y)
                           for k, q in ptq.items()}
    res["int8_ptq_accuracy"] = res["ptq_accuracy"]["int8_channel"]
    res["int4_group_ptq_accuracy"] = res["ptq_accuracy"]["int4_group128"]

    def w8a8(scales):
        f = jax.jit(lambda q, s, x: jol.quantized_apply(model, q, x, mode="w8a8",
                                                      act_scales=s, train=False))
        return lambda x: f(q8, scales, x)

    calib = [jnp.asarray(data.train.x[i:i + 128]) for i in range(0, 512, 128)]
    static = jol.calibrate(model, variables, calib, train=False, method="percentile")
    res["int8_w8a8_static_accuracy"] = accuracy(w8a8(static), x, y)
    dyn = jax.jit(lambda q, x: jol.quantized_apply(model, q, x, mode="w8a8", train=False))
    res["int8_w8a8_dynamic_accuracy"] = accuracy(lambda x: dyn(q8, x), x, y)

    t0 = time.perf_counter()
    qat_vars, qat_hist = jol.train.fit(
        model, data, optax.adam(2e-4), epochs=qat_epochs, batch_size=64, variables=variables,
        param_transform=lambda p: jol.fake_quant(p, where=int4_where), patience=4)
    res["int4_qat_seconds"] = round(time.perf_counter() - t0, 1)
    q4_qat = jol.quantize(qat_vars, where=int4_where)
    res["int4_qat_accuracy"] = accuracy(lambda x: apply(jol.dequantize(q4_qat), x), x, y)
    for k in ("int8_ptq", "int4_group_ptq", "int4_qat", "int8_w8a8_static",
              "int8_w8a8_dynamic"):
        res[f"{k}_drop_points"] = round(fp32 - res[f"{k}_accuracy"], 2)
    res["ptq_drop_points"] = {k: round(fp32 - v, 2) for k, v in res["ptq_accuracy"].items()}
    res["storage"] = storage(variables["params"])
    res["storage_scope"] = ("params tree (biases and BatchNorm scale/bias stay fp32; "
                            "batch_stats not included)")
    res["bn_fold_then_int8"] = bn_fold_deployment(model, variables, x, y)
    res["bn_fold_then_int8"]["drop_points"] = round(
        fp32 - res["bn_fold_then_int8"]["int8_accuracy"], 2)
    res["int4_policy"] = (f"int4 per group of {GROUP} along the contraction axis where it "
                          "divides (Dense kernels), int4 per output channel elsewhere (convs)")
    res["qwix"] = qwix_teacher(model, variables, x, y, fp32)
    return res


# --------------------------------------------------------------------------- MLP speed
def mlp_section(quick: bool) -> dict:
    model = jol.app.MLP(hidden=(4096,), num_classes=1024)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
    variables = jax.jit(lambda k, x: model.init(k, x))(jax.random.PRNGKey(0), x[:1])
    q8 = jol.quantize(variables, bits=8)
    scales = jol.calibrate(model, variables, [x[:512], x[512:]], method="percentile")

    def qapply(mode, native_on=True, static=False):
        """A jitted forward and its arguments, traced with the native kernel on or off."""
        def f(q, x, s):
            return jol.quantized_apply(model, q, x, mode=mode, act_scales=s)
        jitted, call_args = jax.jit(f), (q8, x, scales if static else None)
        with native.use_native_int8(native_on):  # the choice is made when tracing
            jax.block_until_ready(jitted(*call_args))
        return jitted, call_args

    variants = {
        "weight_only_int8": qapply("weight_only"),
        "w8a8_dynamic": qapply("w8a8"),
        "w8a8_static": qapply("w8a8", static=True),
        "w8a8_dynamic_xla_dot": qapply("w8a8", native_on=False),
        "w8a8_static_xla_dot": qapply("w8a8", native_on=False, static=True),
    }
    fns = {"fp32": jax.jit(lambda v, x: model.apply(v, x))}
    args = {"fp32": (variables, x)}
    for k, (f, a) in variants.items():
        fns[k], args[k] = f, a
    qwix_fns, qwix_info = qwix_mlp(model, variables, x)
    for k, (f, a) in qwix_fns.items():
        fns[k], args[k] = f, a
    rounds = 5 if quick else 40
    t, cpu, per_round = time_interleaved(fns, args, rounds)
    ref = fns["fp32"](*args["fp32"])
    res = {
        "batch": 1024, "rounds": rounds,
        "median_ms": {k: round(v * 1e3, 2) for k, v in t.items()},
        "speedup_vs_fp32": {k: ratio(t["fp32"], v) for k, v in t.items() if k != "fp32"},
        "speedup_vs_fp32_median_of_round_ratios": round_ratios(per_round),
        "median_cpu_ms": {k: round(v * 1e3, 2) for k, v in cpu.items()},
        "cpu_time_ratio_vs_fp32": {k: ratio(cpu["fp32"], v) for k, v in cpu.items()
                                   if k != "fp32"},
        "xla_temp_bytes_per_call": {k: temp_bytes(fns[k], args[k])
                                    for k in ("fp32", "weight_only_int8")},
        "relative_max_error_vs_fp32": {k: rel_err(fns[k](*args[k]), ref)
                                       for k in fns if k != "fp32"},
        "native_int8_kernel": native.native_int8_status(),
        "storage": storage(variables["params"]),
        "qwix": qwix_info,
    }
    return res


# --------------------------------------------------------------------------- Qwix
def _qwix():
    try:
        import qwix
        return qwix, None
    except Exception as e:  # not installed or broken: reported, not fatal
        return None, f"{type(e).__name__}: {e}"


def _qwix_quantize(qwix, model, params, x_example, rule: dict, init_kwargs=None):
    qmodel = qwix.quantize_model(
        model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", **rule)]))
    abstract = jax.eval_shape(lambda k, x: qmodel.init(k, x, **(init_kwargs or {})),
                              jax.random.PRNGKey(0), x_example)
    return qmodel, qwix.quantize_params(params, abstract["params"])


def _qwix_bytes(tree) -> dict:
    leaves = jax.tree.leaves(tree)
    reported = sum(int(leaf.nbytes) for leaf in leaves)
    nominal = sum(int(np.ceil(leaf.size * jnp.iinfo(leaf.dtype).bits / 8))
                  if jnp.issubdtype(leaf.dtype, jnp.integer) else int(leaf.nbytes)
                  for leaf in leaves)
    return {"bytes_reported_by_jax": reported, "bytes_if_packed": nominal}


QWIX_RULES = {
    "int8_weight_only": {"weight_qtype": jnp.int8},
    "int8_w8a8_dynamic": {"weight_qtype": jnp.int8, "act_qtype": jnp.int8},
    "int4_group128": {"weight_qtype": jnp.int4, "tile_size": GROUP},
}


def qwix_mlp(model, variables, x):
    qwix, err = _qwix()
    if qwix is None:
        return {}, {"error": err}
    info, fns = {"version": getattr(qwix, "__version__", "?")}, {}
    fp32 = jol.tree_nbytes(variables["params"])
    for name, rule in QWIX_RULES.items():
        try:
            qmodel, qp = _qwix_quantize(qwix, model, variables["params"], x[:1], rule)
            size = _qwix_bytes(qp)
            info[name] = {**size, "ratio_reported": ratio(fp32, size["bytes_reported_by_jax"]),
                          "ratio_if_packed": ratio(fp32, size["bytes_if_packed"])}
            if name != "int4_group128":
                fns[f"qwix_{name}"] = (jax.jit(lambda p, x, m=qmodel: m.apply({"params": p}, x)),
                                       (qp, x))
        except Exception as e:
            info[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return fns, info


def qwix_teacher(model, variables, x, y, fp32_acc):
    qwix, err = _qwix()
    if qwix is None:
        return {"error": err}
    out = {}
    others = {k: v for k, v in variables.items() if k != "params"}
    for name, rule in QWIX_RULES.items():
        try:
            qmodel, qp = _qwix_quantize(qwix, model, variables["params"], x[:1], rule,
                                        {"train": False})
            f = jax.jit(lambda p, x, m=qmodel: m.apply({"params": p, **others}, x, train=False))
            acc = accuracy(lambda x, f=f, qp=qp: f(qp, x), x, y)
            size = _qwix_bytes(qp)
            out[name] = {"accuracy": acc, "drop_points": round(fp32_acc - acc, 2), **size,
                         "ratio_reported": ratio(jol.tree_nbytes(variables["params"]),
                                                 size["bytes_reported_by_jax"])}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return out


# --------------------------------------------------------------------------- latency
def read_bandwidth(mib: int = 64, repeats: int = 9) -> dict:
    """Read bandwidth (GB/s) of this machine now: NumPy's max over ``mib`` MiB of float32 on
    one thread (the fastest plain read NumPy has: ~25 GB/s on a quiet machine here, where
    its sum ran 10-25), and two threads each reading one half."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    halves = np.split(a, 2)

    def one():
        a.max()

    def two():
        threads = [threading.Thread(target=h.max) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    dst = np.empty_like(a)

    def copy():  # a streaming copy: each byte read once and written once
        np.copyto(dst, a)

    out = {"loadavg": os.getloadavg()}
    for name, fn, moved in (("one_thread", one, a.nbytes), ("two_threads", two, a.nbytes),
                            ("copy", copy, 2 * a.nbytes)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_gb_per_s"] = round(moved / float(np.median(times)) / 1e9, 2)
    return out


def fp32_peak(n: int = 1024, repeats: int = 9) -> dict:
    """XLA's float32 matmul rate (GFLOP/s) on a compute-bound ``n x n @ n x 4n`` product:
    the compute floor of every float-accumulating path. A weight-only kernel must give
    ``apply(dequantize(q))`` within summation error, so it does the same float32 FMAs
    as fp32; once fp32 is compute-bound (large batches), reading fewer weight bytes
    cannot make it much faster."""
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, 4 * n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"shape": [n, n, 4 * n], "loadavg": os.getloadavg(),
            "gflop_per_s": round(2 * n * n * 4 * n / float(np.median(times)) / 1e9, 1)}


def _dense_layers(rng, dims) -> list[tuple[jax.Array, jax.Array]]:
    return [(jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
             jnp.asarray(rng.standard_normal(o) * 0.1, jnp.float32))
            for i, o in zip(dims[:-1], dims[1:])]


def _mlp(matmul):
    """The MLP forward ``f(params, x)``, ``params = [(weight, bias), ...]``, with
    ``matmul(x, weight)`` for each layer's product. Weights are arguments, not constants
    closed over: XLA would otherwise fold their dequantization at compile time."""
    def forward(params, x):
        for i, (w, b) in enumerate(params):
            x = matmul(x, w) + b[None]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x
    return forward


def mlp_library_variants(layers, x_calib) -> tuple[dict, dict]:
    """``{name: (forward, params)}`` for each quantized mode on jaxopt_lab's ops directly
    (what `quantized_apply` calls per layer): weight-only int8 / int4 g128 via
    `weight_only_matmul`, W8A8 via `int8_dot_general` with static or dynamic scales."""
    kernels = [w for w, _ in layers]
    biases = [b for _, b in layers]
    q8 = [jol.quantize(w, bits=8, granularity="channel") for w in kernels]
    q4 = [jol.quantize(w, bits=4, granularity="group", group_size=GROUP)
          if w.shape[0] % GROUP == 0 else jol.quantize(w, bits=4, granularity="channel")
          for w in kernels]
    dims = (((1,), (0,)), ((), ()))
    # Static activation scales: the max |input| of each layer over the calibration batch.
    static, h = [], x_calib
    for i, (w, b) in enumerate(layers):
        static.append(jnp.max(jnp.abs(h)) / 127.0)
        h = h @ w + b[None]
        h = jax.nn.relu(h) if i < len(layers) - 1 else h

    def w8a8(x, w, dynamic):
        qt, sx = w if not dynamic else (w, None)
        if dynamic:
            qx, sx = jol.quantize_activations(x, reduce_axes=(1,))
        else:
            qx = int8_ops.quantize_with(x, sx)
        return jol.int8_dot_general(qx, qt.qvalue, dims, lhs_scale=sx,
                                    rhs_scale=qt.scale[None])

    return {
        "fp32": (_mlp(lambda x, w: x @ w), layers),
        "int8_weight_only": (_mlp(weight_only_matmul), list(zip(q8, biases))),
        "int4_g128_weight_only": (_mlp(weight_only_matmul), list(zip(q4, biases))),
        "w8a8_static": (_mlp(lambda x, w: w8a8(x, w, False)),
                        list(zip(zip(q8, static), biases))),
        "w8a8_dynamic": (_mlp(lambda x, w: w8a8(x, w, True)), list(zip(q8, biases))),
    }, {"int8": q8, "int4": q4}


def qwix_latency_variants(dims, layers, x) -> tuple[dict, dict]:
    """Qwix's PTQ forwards of the same MLP (as a linen model with the same weights)."""
    import qwix  # the `bench` extra; a missing Qwix fails the comparison

    model = jol.app.MLP(hidden=tuple(dims[1:-1]), num_classes=dims[-1])
    params = {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(layers)}
    out, info = {}, {"version": getattr(qwix, "__version__", "?")}
    for name, rule in QWIX_RULES.items():
        qmodel, qp = _qwix_quantize(qwix, model, params, x[:1], rule)
        out[f"qwix_{name}"] = (lambda p, x, m=qmodel: m.apply({"params": p}, x), qp)
    return out, info


def _bytes_per_call(variant: str, layers, qts) -> int:
    """Weight bytes one batch-1 call must read (codes, scales, biases)."""
    biases = sum(int(b.nbytes) for _, b in layers)
    if variant == "fp32":
        return biases + sum(int(w.nbytes) for w, _ in layers)
    key = "int4" if "int4" in variant else "int8"
    return biases + sum(int(qt.nbytes) for qt in qts[key])


def mlp_latency_section(dims, batches, rounds: int, bandwidth: dict,
                        peak_gflops: float | None = None) -> dict:
    """The MLP at each batch size: every variant timed in interleaved rounds, one process."""
    rng = np.random.default_rng(0)
    layers = _dense_layers(rng, dims)
    calib = jnp.asarray(rng.standard_normal((256, dims[0])), jnp.float32)
    funcs, qts = mlp_library_variants(layers, calib)
    qwix_funcs, qwix_info = qwix_latency_variants(dims, layers, calib)
    funcs.update(qwix_funcs)
    jitted = {k: jax.jit(f) for k, (f, _) in funcs.items()}
    res = {"dims": list(dims), "qwix": qwix_info, "rows": {}}
    for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, dims[0])), jnp.float32)
        args = {k: (p, x) for k, (_, p) in funcs.items()}
        inner = max(1, min(20, 64 // batch))  # batch 1: many calls per timing
        rounds_here = rounds if batch < 1024 else max(3, rounds // 3)
        load = os.getloadavg()
        t, cpu, per_round = time_interleaved(jitted, args, rounds_here, inner=inner)
        ref = jitted["fp32"](*args["fp32"])
        row = {
            "rounds": rounds_here, "calls_per_timing": inner,
            "median_process_cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu.items()}, "loadavg_before": load,
            "loadavg_after": os.getloadavg(),
            "median_ms": {k: round(v * 1e3, 4) for k, v in t.items()},
            "speedup_vs_fp32": {k: ratio(t["fp32"], v) for k, v in t.items() if k != "fp32"},
            "speedup_vs_fp32_median_of_round_ratios": round_ratios(per_round),
            "relative_max_error_vs_fp32": {k: rel_err(jitted[k](*args[k]), ref)
                                           for k in jitted if k != "fp32"},
        }
        acts = 4 * batch * sum(dims)  # float32 activations read and written once a layer
        limit = {}
        for k in ("fp32", "int8_weight_only", "int4_g128_weight_only", "w8a8_static",
                  "w8a8_dynamic"):
            nbytes = _bytes_per_call(k, layers, qts) + acts
            floor = {b: nbytes / (gbs * 1e9) for b, gbs in bandwidth.items()}
            limit[k] = {"bytes_per_call": nbytes,
                        "floor_ms": {b: round(f * 1e3, 4) for b, f in floor.items()},
                        "fraction_of_limit": {b: round(f / t[k], 3)
                                              for b, f in floor.items()}}
        row["memory_bound"] = limit
        if peak_gflops:
            flops = 2 * batch * sum(i * o for i, o in zip(dims[:-1], dims[1:]))
            compute = flops / (peak_gflops * 1e9)
            mem = limit["int8_weight_only"]["floor_ms"]["one_thread"] / 1e3
            row["compute_bound"] = {
                "flops": flops, "fp32_floor_ms": round(compute * 1e3, 4),
                # fp32's time over the larger of two floors of a float-accumulating int8
                # weight-only path: its weight bytes at the read bandwidth, and its FLOPs
                # at XLA's measured fp32 matmul rate. Not a hard limit: a native kernel may
                # run its FMAs faster than XLA's matmul does.
                "int8_weight_only_speedup_at_xla_fp32_rate": round(
                    t["fp32"] / max(compute, mem), 3)}
        res["rows"][f"batch_{batch}"] = row
    return res


class ResNetLike(nn.Module):
    """ResNet-18's layout (4 stages of 2 basic blocks, stride 2 between stages) with
    ``base`` filters in the first stage, BatchNorm folded away (plain biased convs)."""

    base: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.base, (3, 3))(x))
        for stage in range(4):
            feat = self.base * 2**stage
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                y = nn.relu(nn.Conv(feat, (3, 3), strides=stride)(x))
                y = nn.Conv(feat, (3, 3))(y)
                if stride != 1 or x.shape[-1] != feat:
                    x = nn.Conv(feat, (1, 1), strides=stride)(x)
                x = nn.relu(x + y)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _conv_bytes(tree) -> int:
    """Bytes of the weights a call reads: QTensor codes and scales, float leaves."""
    return int(jol.tree_nbytes(tree))


def convnet_section(model, batches, size: int, channels: int, rounds: int,
                    bandwidth: dict, **kw) -> dict:
    """A conv net: fp32 against `quantized_apply` int8 / int4 weight-only and W8A8
    (dynamic and static scales), every variant in interleaved rounds, with the bytes each
    call reads (weights; activations excluded) over the measured bandwidth."""
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((16, size, size, channels)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x0[:1])
    q8 = jol.quantize(variables, bits=8)
    q4 = jol.quantize(variables, where=int4_where)
    scales = jol.calibrate(model, variables, [x0], method="percentile", **kw)
    fns = {
        "fp32": (jax.jit(lambda v, x: model.apply(v, x, **kw)), variables),
        "int8_weight_only": (jax.jit(lambda q, x: jol.quantized_apply(
            model, q, x, mode="weight_only", **kw)), q8),
        "int4_weight_only": (jax.jit(lambda q, x: jol.quantized_apply(
            model, q, x, mode="weight_only", **kw)), q4),
        "w8a8_dynamic": (jax.jit(lambda q, x: jol.quantized_apply(model, q, x, mode="w8a8",
                                                                   **kw)), q8),
        "w8a8_static": (jax.jit(lambda q, x: jol.quantized_apply(
            model, q, x, mode="w8a8", act_scales=scales, **kw)), q8),
    }
    weights = {k: _conv_bytes(p) for k, (_, p) in fns.items()}
    res = {"model": type(model).__name__, "input": [size, size, channels],
           "weight_bytes": weights, "rows": {}}
    jitted = {k: f for k, (f, _) in fns.items()}
    for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
        args = {k: (p, x) for k, (_, p) in fns.items()}
        load = os.getloadavg()
        t, cpu, per_round = time_interleaved(jitted, args, rounds,
                                             inner=max(1, min(10, 16 // batch)))
        ref = jitted["fp32"](*args["fp32"])
        res["rows"][f"batch_{batch}"] = {
            "rounds": rounds, "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "median_ms": {k: round(v * 1e3, 4) for k, v in t.items()},
            "median_process_cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu.items()},
            "speedup_vs_fp32": {k: ratio(t["fp32"], v) for k, v in t.items() if k != "fp32"},
            "speedup_vs_fp32_median_of_round_ratios": round_ratios(per_round),
            "relative_max_error_vs_fp32": {k: rel_err(jitted[k](*args[k]), ref) for k in jitted
                                           if k != "fp32"},
            "weight_bytes_floor_ms": {k: {b: round(w / (g * 1e9) * 1e3, 4)
                                          for b, g in bandwidth.items()}
                                      for k, w in weights.items()},
            "weight_bytes_share_of_fp32_time": {
                k: round(w / (bandwidth["copy"] * 1e9) / t["fp32"], 4)
                for k, w in weights.items()},
        }
    return res


def _resnet_convs(base: int, size: int) -> list[tuple[int, int, int, int, int]]:
    """``(spatial, Cin, Cout, window, stride)`` of every convolution of `ResNetLike`."""
    out, s, c = [(size, 3, base, 3, 1)], size, base
    for stage in range(4):
        f = base * 2**stage
        for block in range(2):
            st = 2 if stage > 0 and block == 0 else 1
            out.append((s, c, f, 3, st))
            out.append((s // st, f, f, 3, 1))
            if st != 1 or c != f:
                out.append((s, c, f, 1, st))
            s, c = s // st, f
    return out


def conv_layer_section(base: int, size: int, rounds: int, limit: int | None = None) -> dict:
    """Each convolution of the ResNet-like net alone at batch 1: XLA's fp32 conv, W8A8
    (dynamic per-example activation scales, the native int8 conv kernel), int8 weight-only
    through the native kernel (`weight_only_conv`) and XLA's conv on the dequantized
    kernel, interleaved; which is fastest, per layer."""
    from jaxopt_lab.quant.weight_only import weight_only_conv

    rng = np.random.default_rng(3)
    dn = ("NHWC", "HWIO", "NHWC")
    rows, totals = [], {}
    for (s, c, f, k, st) in _resnet_convs(base, size)[:limit]:
        x = jnp.asarray(rng.standard_normal((1, s, s, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, c, f)) / np.sqrt(k * k * c), jnp.float32)
        qt = jol.quantize(w, bits=8)
        scale = jnp.asarray(qt.scale, jnp.float32).reshape(1, 1, 1, f)

        def conv(x, w, st=st):
            return jax.lax.conv_general_dilated(x, w, (st, st), "SAME", dimension_numbers=dn)

        def w8a8(x, codes, scale, st=st):
            q, sx = jol.quantize_activations(x, reduce_axes=(1, 2, 3))
            return jol.int8_conv_general_dilated(q, codes, (st, st), "SAME", lhs_scale=sx,
                                                 rhs_scale=scale, dimension_numbers=dn)

        fns = {"fp32": jax.jit(conv), "w8a8_dynamic": jax.jit(w8a8),
               "int8_weight_only_native": jax.jit(
                   lambda x, q, st=st: weight_only_conv(x, q, (st, st), "SAME")),
               "int8_dequantized_xla_conv": jax.jit(
                   lambda x, q: conv(x, q.dequantize(jnp.float32)))}
        args = {"fp32": (x, w), "w8a8_dynamic": (x, qt.qvalue, scale),
                "int8_weight_only_native": (x, qt), "int8_dequantized_xla_conv": (x, qt)}
        t, cpu, _ = time_interleaved(fns, args, rounds, inner=10)
        us = {kk: round(v * 1e6, 1) for kk, v in t.items()}
        for kk, v in us.items():
            totals[kk] = round(totals.get(kk, 0.0) + v, 1)
        rows.append({"spatial": s, "cin": c, "cout": f, "window": k, "stride": st,
                     "macs": (s // st) ** 2 * k * k * c * f, "fp32_weight_bytes": int(w.nbytes),
                     "median_us": us,
                     "median_process_cpu_us": {kk: round(v * 1e6, 1) for kk, v in cpu.items()},
                     "fastest": min(us, key=us.get)})
    return {"batch": 1, "rounds": rounds, "loadavg_after": os.getloadavg(), "layers": rows,
            "sum_us": totals}


def layer_section(size: int, rounds: int) -> dict:
    """One ``size x size`` layer at batch 1 with bfloat16 activations: bf16 and fp32 weights
    against int8 and int4 g128 weight-only (the GPU question of issue 16; on GPU the
    weight-only product is XLA's dot on the dequantized weight)."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((size, size)) / np.sqrt(size), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, size)), jnp.bfloat16)
    params = {
        "bf16": w.astype(jnp.bfloat16), "fp32": w,
        "int8_weight_only": jol.quantize(w, bits=8, granularity="channel"),
        "int4_g128_weight_only": jol.quantize(w, bits=4, granularity="group",
                                              group_size=GROUP),
    }
    fns = {"bf16": jax.jit(lambda w, x: x @ w),
           "fp32": jax.jit(lambda w, x: (x.astype(jnp.float32) @ w).astype(x.dtype)),
           "int8_weight_only": jax.jit(lambda q, x: weight_only_matmul(x, q)),
           "int4_g128_weight_only": jax.jit(lambda q, x: weight_only_matmul(x, q))}
    args = {k: (params[k], x) for k in fns}
    t, _, per_round = time_interleaved(fns, args, rounds, inner=10)
    return {"size": size, "batch": 1, "activations": "bfloat16", "rounds": rounds,
            "median_ms": {k: round(v * 1e3, 4) for k, v in t.items()},
            "speedup_vs_bf16": {k: ratio(t["bf16"], v) for k, v in t.items() if k != "bf16"},
            "speedup_vs_bf16_median_of_round_ratios": round_ratios(per_round, "bf16")}


def latency(smoke: bool, rounds: int = 15) -> dict:
    """The issue-16 latency tables: the MLP at batch 1/8/16/64/1024, the ResNet-like net and
    the bundled TeacherCNN at 1/8/64, the ResNet's convolutions one by one at batch 1."""
    bandwidth = read_bandwidth(8 if smoke else 64)
    bw = {"one_thread": bandwidth["one_thread_gb_per_s"],
          "two_threads": bandwidth["two_threads_gb_per_s"], "copy": bandwidth["copy_gb_per_s"]}
    peak = fp32_peak(256 if smoke else 1024)
    if smoke:
        parts = {"mlp": lambda: mlp_latency_section((128, 256, 128), (1,), 2, bw,
                                                    peak["gflop_per_s"]),
                 "resnet18_like": lambda: convnet_section(ResNetLike(base=4), (1,), 8, 3, 2, bw),
                 "resnet18_like_layers": lambda: conv_layer_section(4, 8, 2, limit=2),
                 "layer_batch_1": lambda: layer_section(256, 2)}
    else:
        parts = {"mlp": lambda: mlp_latency_section((1024, 4096, 1024),
                                                    (1, 8, 16, 64, 1024), rounds, bw,
                                                    peak["gflop_per_s"]),
                 "resnet18_like": lambda: convnet_section(ResNetLike(base=16), (1, 8, 64), 32,
                                                          3, rounds, bw),
                 "teacher_cnn": lambda: convnet_section(jol.app.TeacherCNN(), (1, 8, 64), 8,
                                                        1, rounds, bw, train=False),
                 "resnet18_like_layers": lambda: conv_layer_section(16, 32, max(3, rounds // 2)),
                 "layer_batch_1": lambda: layer_section(4096, rounds)}
    out = {"read_bandwidth": bandwidth, "fp32_peak": peak, "native": {
        "weight_only": native.native_weight_only_status(), "int8": native.native_int8_status()}}
    for name, part in parts.items():  # one failing part keeps the others' figures
        try:
            out[name] = part()
        except Exception:
            out[name] = {"failed": traceback.format_exc()[-3000:]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs/rounds")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, latency tables only (< 30 s; for tests)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the latency tables (no accuracy training)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--rounds", type=int, default=15,
                        help="interleaved timing rounds of the latency tables")
    args = parser.parse_args(argv)
    result = {
        "quick": args.quick, "smoke": args.smoke,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "targets": {"storage_int8": ">= 3.95x", "storage_int4_group128": ">= 7.5x",
                    "int8_ptq_drop": "<= 0.5 points", "int4_ptq_drop": "<= 2 points",
                    "int4_qat_drop": "<= 1 point", "w8a8_speedup": ">= 1.5x",
                    "batch_1": "int8 weight-only >= 3x fp32, int4 g128 >= 5x and > int8",
                    "batch_16": "every quantized mode >= 1.3x fp32",
                    "batch_1024": "int4 g128 >= 1.0x; int8 weight-only, W8A8 no worse",
                    "resnet18_like": "W8A8 and int8 weight-only >= 1.0x fp32"},
    }
    sections = [("latency", latency)]
    if not (args.smoke or args.latency_only):
        sections += [("mlp_1024_4096_1024", mlp_section), ("digits_teacher", teacher_section)]
    failed = []
    for name, section in sections:
        try:
            result[name] = (section(args.smoke, args.rounds) if name == "latency"
                            else section(args.quick))
        except Exception:  # reported as failed below, and the exit status says so
            result[name] = {"failed": traceback.format_exc()[-3000:]}
            failed.append(name)
    failed += [f"latency/{k}" for k, v in result.get("latency", {}).items()
               if isinstance(v, dict) and "failed" in v]
    result["failed_sections"] = failed
    name = ("quantization_smoke" if args.smoke
            else "quantization_latency" if args.latency_only else "quantization")
    if args.smoke:  # never into benchmarks/results/
        import tempfile
        emit(name, result, out_dir=tempfile.mkdtemp(prefix="jol_smoke_"), smoke=True)
    else:
        emit(name, result)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": name, **result}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
