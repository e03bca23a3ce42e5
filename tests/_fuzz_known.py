"""Predicates of the known faults found by the fuzz tests (not a test module).

Each describes exactly the inputs that trigger one reported fault; the fuzz tests skip the
property check there (so one fault does not hide others) and tests/test_fuzz_known_faults.py
pins a minimal reproducer of each. Delete a predicate when its fault is fixed.
"""

from __future__ import annotations


import _fuzz as fz
import jax
import jax.numpy as jnp
import numpy as np

import jaxopt_lab as jol


def lsq_init_overflow(x) -> bool:
    """lsq_init: mean|v| is summed in float32 and overflows for huge float32 leaves: the step
    is inf (and lsq_fake_quant then gives NaN)."""
    a = np.abs(fz.jax_view(x).astype(np.float64))
    return np.sum(a) > float(np.finfo(np.float32).max) / 2


def lsq_low_precision_overflow(x, step, qp) -> bool:
    """lsq_fake_quant: round(clip(v / s)) * s is cast back to a float16/bfloat16 leaf's dtype
    and overflows to inf when the rounded-up code lands beyond the dtype's max."""
    v = fz.jax_view(x).astype(np.float64)
    s = np.asarray(step, np.float64)
    with np.errstate(all="ignore"):
        out = np.abs(np.round(np.clip(v / s, -qp - 1, qp)) * s)
    return out.max(initial=0) > float(jnp.finfo(x.dtype).max)


def channel_mask_empty(tree, where) -> bool:
    """channel_mask: a selected empty leaf (zero channels) raises ZeroDivisionError."""
    return any(on and np.size(x) == 0 for x, on in zip(
        jax.tree.leaves(tree), jax.tree.leaves(jol._select.selection(tree, where))))


def sparsity_subnormal(tree) -> bool:
    """sparsity: XLA flushes subnormals, so count_nonzero counts them as zeros."""
    def subnormal(x):
        a = np.abs(fz.jax_view(x).astype(np.float32))
        return ((a > 0) & (a < np.finfo(np.float32).tiny)).any()

    return any(fz.is_float(x) and subnormal(x) for x in jax.tree.leaves(tree))


def distill_overflow(teacher, student, temperature) -> bool:
    """distill_loss: logits / T or T**2 overflowing float32 give NaN (finite inputs)."""
    top = max(float(np.max(np.abs(fz.jax_view(x).astype(np.float64)), initial=0))
              for x in (teacher, student))
    t = float(temperature)
    return top / t > 1e37 or t**2 > 1e37


def cosine_overflow(teacher, student, kind) -> bool:
    """feature_distill_loss(kind="cosine"): squared norms overflow float32 -> inf / inf = NaN."""
    top = max(float(np.max(np.abs(fz.jax_view(x).astype(np.float64)), initial=0))
              for x in (teacher, student))
    return kind == "cosine" and top > 1e18


def fold_overflow(kernel, bias, mean, var, scale, beta) -> bool:
    """bn_fold / bn_fold_nnx: a folded kernel or bias beyond its dtype's range becomes inf
    silently (e.g. float16 params with a large BatchNorm gain), though the unfolded model is
    finite; it should raise a ValueError naming the pair."""
    f64 = lambda v: np.zeros(()) if v is None else np.asarray(v, np.float64)  # noqa: E731
    with np.errstate(all="ignore"):
        m = f64(scale) / np.sqrt(f64(var) + 1e-5)
        folded = (f64(kernel) * m, f64(beta) + (f64(bias) - f64(mean)) * m)
    top = float(jnp.finfo(kernel.dtype).max)
    return any(np.abs(v).max(initial=0) > top for v in folded)


def pearson_scale(x, y) -> bool:
    """pearson: XLA flushes float32 subnormals to 0. Under jit x / max|x| becomes a multiply by
    a reciprocal that is subnormal for max|x| > 2**126 (so 0), and an input varying only by
    subnormal amounts looks constant: finite, non-constant inputs give NaN."""
    def flushed_constant(v):
        f = fz.ftz(np.asarray(v, np.float32))
        return f.max(initial=0) == f.min(initial=0)

    big = max(np.abs(x).max(initial=0), np.abs(y).max(initial=0)) > 2.0**125
    return big or flushed_constant(x) or flushed_constant(y)

def regression_overflow(name, y_true, y_pred) -> bool:
    """mae/mape/rmse: per-element errors (squared for rmse), or the difference itself, are
    computed and summed in float32 and overflow to inf though the metric is representable."""
    with np.errstate(all="ignore"):
        err = np.abs(y_pred - y_true)
        if err.max(initial=0) > float(np.finfo(np.float32).max):  # y_pred - y_true itself
            return True
        if name == "mape":
            err = err / np.maximum(np.abs(y_true), np.finfo(np.float64).eps)
        if name == "rmse":
            err = err**2
        return not (np.sum(err) < float(np.finfo(np.float32).max) / 4)


def normalize_overflow(x, normalize) -> bool:
    """make_dataset(normalize=True): the mean/std of huge float32 inputs overflow in float32,
    so finite inputs come out as inf/NaN."""
    with np.errstate(all="ignore"):
        return normalize and not np.isfinite(np.asarray(x, np.float32).astype(np.float32).std())






def dequantize_overflow(x_hat, dtype) -> bool:
    """dequantize / fake_quant: a float16/bfloat16 leaf near its dtype's max quantizes
    (asymmetric, few bits) to a level just beyond that max; casting back gives +-inf.
    ``x_hat`` is the float32 reconstruction."""
    top = float(jnp.finfo(dtype).max)
    return bool(np.abs(np.asarray(x_hat, np.float64)).max(initial=0) > top)


def huge_scale(qt) -> bool:
    """quantize: with a scale >= 2**126 (|x| ~1e38 at 2-3 bits), XLA turns x / scale into
    x * (1 / scale), a subnormal flushed to 0: every code becomes 0 (or only the pinned
    range ends survive), and asymmetric end levels (q - z) * s overflow to inf."""
    return float(np.max(np.asarray(qt.scale, np.float32))) >= 2.0**125


def histogram_overflow(stats, method) -> bool:
    """calibration_range "percentile"/"mse": after |x| >= 2**127 the histogram's half range
    2**128 is inf in float32, so bin edges are inf/NaN: percentile returns NaN, mse
    silently picks the smallest candidate range."""
    return method in ("percentile", "mse") and any(
        int(np.max(np.asarray(s.exponent))) >= 128 for s in stats.values())


def conv_padding_length(padding, zero_point) -> bool:
    """int8_conv_general_dilated with a zero point pads the input itself and accepts explicit
    padding with the wrong number of (lo, hi) pairs (here 1 for 2 spatial axes) silently."""
    return zero_point is not None and not isinstance(padding, str) and len(padding) != 2
