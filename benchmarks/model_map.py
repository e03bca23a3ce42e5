"""What the model map changes: quantization error with and without it, fallbacks, speed.

On models built from stock Flax layers (tests/_flax_models.py: a linen transformer with
attention, DenseGeneral, Einsum and a tied Embed head, the same in NNX, and conv nets
whose first conv reads 1 or 3 channels) this measures, side by side in one process:

* the relative output error ``||y_q - y|| / ||y||`` of weight-only int8 (per channel) and
  int4 (groups of 128, or 32 for the conv nets) quantization, with the map (scales per
  real output element, groups along the real contraction, embeddings and biases float)
  and without it (the shape rule: every float leaf with ndim >= 2, scales per last axis);
* the leaves that fell back to another layout (LayoutFallbackWarning), per model;
* the embedding policy on the transformer: int8 error with the tied embedding left float
  (the map's default) and quantized per row;
* jitted quantized_apply time, int8 weight-only against float weights through the same
  program (median of interleaved rounds; weights passed as arguments).

Writes ``benchmarks/results/model_map.json``. ``--smoke``: the partitioned transformer only, one
round, writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _flax_models as fm  # noqa: E402
from _util import emit  # noqa: E402

import jaxopt_lab as jol  # noqa: E402


def _rel(y, y0) -> float:
    return float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0))


def _quantize(tree, mm, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", jol.LayoutFallbackWarning)
        try:
            q = jol.quantize(tree, model_map=mm, **kw)
        except ValueError as e:
            return None, [f"error: {e}"]
    lines = [line.strip() for w in caught if issubclass(w.category, jol.LayoutFallbackWarning)
             for line in str(w.message).splitlines()[1:]]
    return q, lines


def _time(f, *args, rounds):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _models():
    model, variables, ids = fm.linen_transformer(partitioned=True)
    yield ("linen_transformer_partitioned", model, variables, (ids,), 128,
           lambda q: jol.quantized_apply(model, q, ids), lambda: model.apply(variables, ids))
    nmodel, ids = fm.nnx_transformer()
    state = nnx.state(nmodel, nnx.Param)
    yield ("nnx_transformer", nmodel, state, (ids,), 128,
           lambda q: jol.quantized_apply(nmodel, q, ids), lambda: nmodel(ids))
    for c in (1, 3):
        model, variables, x = fm.linen_convnet(c)
        yield (f"linen_convnet_{c}ch", model, variables, (x,), 32,
               lambda q, m=model, x=x: jol.quantized_apply(m, q, x),
               lambda m=model, v=variables, x=x: m.apply(v, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one model, one round, write nothing")
    args = parser.parse_args()
    rounds = 1 if args.smoke else 30
    rows = []
    for i, (name, model, variables, call_args, group, run_q, run_f) in enumerate(_models()):
        # --smoke: the partitioned transformer alone goes through every line (its embedding
        # row too); each further model (built only when reached) adds compiles of the same
        # lines.
        if args.smoke and i != 0:
            break
        mm = jol.model_map(model, variables if name != "nnx_transformer" else None,
                           *call_args)
        y0 = run_f()
        row = {"model": name, "kernels": sum(v.role == "kernel" for v in mm.values())}
        for label, use_map in (("map", mm), ("shape_rule", None)):
            for kind, kw in (("int8", dict(bits=8)),
                             ("int4_g%d" % group, dict(bits=4, granularity="group",
                                                       group_size=group))):
                q, fallbacks = _quantize(variables, use_map, **kw)
                err = None if q is None else _rel(run_q(q), y0)
                row[f"{kind}_{label}"] = {"rel_error": err, "fallbacks": fallbacks}
        if name == "linen_transformer_partitioned":
            q_emb, _ = _quantize(variables, mm, bits=8, where=mm.where("kernel", "embedding"))
            row["int8_map_embedding_quantized_per_row"] = _rel(run_q(q_emb), y0)
        q8, _ = _quantize(variables, mm, bits=8)
        f = jax.jit(run_q)  # the float variables run the same traced program, unhooked
        t_f, t_q = [], []
        for _ in range(rounds):  # interleaved; weights are arguments, never constants
            t_f.append(_time(f, variables, rounds=1))
            t_q.append(_time(f, q8, rounds=1))
        row["time_ms"] = {"float": 1e3 * statistics.median(t_f),
                          "int8_weight_only": 1e3 * statistics.median(t_q)}
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k != "model"}, flush=True)
    result = {"rows": rows, "note": "rel_error = ||y_q - y|| / ||y|| of weight-only "
              "quantized_apply against the float model on the same inputs"}
    if args.smoke:
        print(result)
        return
    emit("model_map", result)


if __name__ == "__main__":
    main()
