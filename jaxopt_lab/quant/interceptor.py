"""Run an unchanged linen or NNX model on quantized weights, through the one hook layer.

`quantized_apply(model, qvariables, *args, mode=...)` replaces ``model.apply`` (linen) or
calling the module (NNX). The model is traced once (`jaxopt_lab.core.flax_hooks`) and
every op that consumes a quantized kernel -- a ``dot_general`` (Dense, DenseGeneral,
attention, Einsum, ``Embed.attend``, ``jnp.einsum``) or a convolution -- is computed from
the kernel's codes. Which axes contract is read from the op, so attention kernels
``(embed, heads, head_dim)`` and their per ``heads x head_dim`` scales are handled like a
Dense kernel. Boxed (partitioned) parameters are unboxed by Flax during the trace.

* ``mode="weight_only"``: float compute on the codes: a kernel whose contraction is its
  leading axes (Dense, DenseGeneral, attention, Einsum kernels) contracts through
  `weight_only_matmul` as the ``(K, N)`` matrix it is -- int8 or packed int4, per tensor,
  per channel or per group (on CPU a native kernel reads the codes directly); a plain 2-D
  convolution on an HWIO kernel runs as patches @ kernel through the same kernel
  (`weight_only_conv`); other int8 kernels go through `weight_only_dot_general`; every
  other `QTensor` is dequantized where an op needs it. The result equals
  ``apply(dequantize(qvariables), ...)`` up to summation order.
* ``mode="w8a8"``: each such op whose kernel is a symmetric integer `QTensor` with one
  scale per tensor or per output element quantizes its input to int8 -- static calibrated
  scales (``act_scales`` from `calibrate`) or dynamic per-token ones -- and computes
  int8 x int8 -> int32 (`jaxopt_lab.quant.int8_ops`), rescaled to float. Everything else
  (biases, norms, group-wise or fp8 kernels) runs in float on dequantized values. A call
  that intercepts no op raises ``ValueError`` rather than silently running in float.

Layers are keyed by their module path joined with ``/`` (``"Dense_0"``,
``"Block_0/Conv_1"``, ``"MultiHeadDotProductAttention_0/query"``; NNX: attribute path).

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
  >>> model = nn.Dense(3)
  >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> qvars = jol.quantize(variables, bits=8)
  >>> y = jax.jit(lambda v, x: jol.quantized_apply(model, v, x, mode="w8a8"))(qvars, x)
  >>> bool(jnp.allclose(y, model.apply(variables, x), atol=0.05))
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.mapping import layer_of, path_names
from jaxopt_lab.quant.int8_ops import (
    int8_conv_general_dilated,
    int8_dot_general,
    quantize_activations,
    quantize_with,
    weight_only_dot_general,
)
from jaxopt_lab.quant.qtensor import QTensor, is_qtensor, packed_length
from jaxopt_lab.quant.weight_only import weight_only_conv, weight_only_matmul

Variables = Any
ActScales = Mapping[str, tuple[jax.Array, jax.Array | None]]
MODES = ("weight_only", "w8a8")


def kernel_scale(qt: QTensor) -> jax.Array:
    """The kernel's scale in keepdims form (scalar, or sized on the channel axes)."""
    scale = jnp.asarray(qt.scale, jnp.float32)
    if qt.granularity == "tensor":
        return scale.reshape(())
    return scale.reshape(tuple(qt.shape[i] if i in qt.axis else 1 for i in range(qt.ndim)))


def int8_ready(qt: Any, contracting: tuple[int, ...]) -> bool:
    """Integer codes, symmetric, one scale per tensor or per element of non-contracted axes,
    no stacked batch axes: a kernel whose contraction can run on its codes."""
    return (is_qtensor(qt) and qt.fp8 is None and qt.symmetric
            and qt.granularity in ("tensor", "channel")
            and not set(qt.axis or ()) & set(contracting)
            and jnp.ndim(qt.qvalue) == len(qt.storage_shape))


def as_matrix(qt: QTensor, contracting: tuple[int, ...]) -> QTensor | None:
    """The kernel as a 2-D ``(K, N)`` `QTensor` (its storage only reshaped), when its
    contraction is its leading axes and its scales fit that view; else None."""
    c = len(contracting)
    if (not is_qtensor(qt) or qt.fp8 is not None or contracting != tuple(range(c))
            or c == 0 or c == qt.ndim or jnp.ndim(qt.qvalue) != len(qt.storage_shape)):
        return None
    k = int(np.prod(qt.shape[:c]))
    n = int(np.prod(qt.shape[c:]))
    if int(np.prod(qt.storage_shape)) != k * packed_length(n, qt.bits) or (
            qt.bits != 8 and qt.ndim - c > 1 and qt.shape[-1] * qt.bits % 8):
        return None  # packed rows would not line up after merging the output axes
    outputs = tuple(range(c, qt.ndim))
    if qt.granularity == "channel" and qt.axis != outputs:
        return None
    if qt.granularity == "group" and qt.group_axis != contracting:
        return None
    meta = dict(bits=qt.bits, shape=(k, n), dtype=qt.dtype, granularity=qt.granularity,
                axis=(1,) if qt.granularity == "channel" else None,
                group_axis=(0,) if qt.granularity == "group" else None,
                group_size=qt.group_size)
    rows = {"tensor": (), "channel": (n,), "group": (k // (qt.group_size or 1), n)}
    shape2 = rows[qt.granularity]
    zero = None if qt.zero_point is None else jnp.reshape(qt.zero_point, shape2)
    return QTensor(jnp.reshape(qt.qvalue, (k, -1)), jnp.reshape(qt.scale, shape2), zero,
                   **meta)


def _dot_layout(eqn, operand: int, perm: tuple[int, ...]):
    """Dimension numbers for ``dot_general(x, leaf)`` and the output permutation back."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x_c, w_c, x_b, w_b = (rc, lc, rb, lb) if operand == 0 else (lc, rc, lb, rb)
    x_ndim = eqn.invars[1 - operand].aval.ndim
    w_ndim = len(perm)
    dn = ((tuple(x_c), tuple(perm[d] for d in w_c)), (tuple(x_b), tuple(perm[d] for d in w_b)))
    # lax.dot_general's output: batch, x free (x order), leaf free (leaf-axis order).
    w_free_op = [d for d in range(w_ndim) if d not in w_c and d not in w_b]  # operand order
    w_free_leaf = sorted(perm[d] for d in w_free_op)
    nb, nx = len(x_b), x_ndim - len(x_c) - len(x_b)
    w_pos = [nb + nx + w_free_leaf.index(perm[d]) for d in w_free_op]
    x_pos = list(range(nb, nb + nx))
    order = list(range(nb)) + (x_pos + w_pos if operand == 1 else w_pos + x_pos)
    return dn, order


class _Quantized:
    """The hook: computes kernel contractions from `QTensor` codes."""

    def __init__(self, mode: str, act_scales: str | ActScales, layers: list[str]):
        self.mode, self.act_scales, self.layers = mode, act_scales, layers
        self.intercepted: list[str] = []

    def activation(self, key: str, x: jax.Array, reduce_axes) -> tuple[jax.Array, ...]:
        """(codes, scale keepdims, zero point) of a layer input."""
        if isinstance(self.act_scales, str):
            return (*quantize_activations(x, reduce_axes=reduce_axes), None)
        if key not in self.act_scales:
            raise ValueError(f"act_scales has no entry for layer {key!r}; calibrated layers: "
                             f"{sorted(self.act_scales)}")
        scale, zero = self.act_scales[key]
        scale = jnp.asarray(scale, jnp.float32)
        if scale.ndim:
            raise ValueError(f"act_scales[{key!r}]: static scales are per-tensor scalars, got "
                             f"shape {scale.shape}")
        return quantize_with(x, scale, zero), scale, zero

    def __call__(self, eqn, uses, views, read, leaves):
        viewed = [v for v in views if v is not None]
        if len(viewed) != 1 or len(uses) != 1:
            return None
        use, view = uses[0], viewed[0]
        qt = leaves[view.leaf]
        perm = flax_hooks.operand_permutation(view)
        if use.op not in ("dot_general", "conv") or perm is None or not is_qtensor(qt):
            return None
        if self.mode == "w8a8" and not int8_ready(qt, use.contracting):
            return None
        x = read(eqn.invars[1 - use.operand])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return None
        key = self.layers[view.leaf]
        out_dtype = eqn.outvars[0].aval.dtype
        if use.op == "dot_general":
            y = self.dot(eqn, use.operand, perm, key, qt, x, out_dtype)
        else:
            y = self.conv(eqn, perm, key, qt, x, out_dtype)
        if y is not None:
            self.intercepted.append(key)
            return [y]
        return None

    def dot(self, eqn, operand, perm, key, qt, x, out_dtype):
        dn, order = _dot_layout(eqn, operand, perm)
        if self.mode == "weight_only":
            if x.dtype != out_dtype or dn[1][0]:
                return None
            x_con, w_con = dn[0]
            mat = as_matrix(qt, tuple(w_con)) if tuple(sorted(w_con)) == tuple(w_con) else None
            if mat is not None:
                x_free = [d for d in range(x.ndim) if d not in x_con]
                x2 = jnp.transpose(x, x_free + list(x_con)).reshape(-1, mat.shape[0])
                y = weight_only_matmul(x2, mat, precision=eqn.params.get("precision"))
                y = y.reshape(tuple(x.shape[d] for d in x_free) + qt.shape[len(w_con):])
            elif int8_ready(qt, tuple(w_con)) and qt.bits == 8:
                y = weight_only_dot_general(x, qt.values(), dn, rhs_scale=kernel_scale(qt),
                                            precision=eqn.params.get("precision"),
                                            preferred_element_type=out_dtype)
            else:
                return None
        else:
            codes, scale, zero = self.activation(key, x, dn[0][0])
            y = int8_dot_general(codes, qt.values(), dn, lhs_scale=scale,
                                 rhs_scale=kernel_scale(qt), lhs_zero_point=zero,
                                 out_dtype=out_dtype)
        return jnp.transpose(y, order) if order != sorted(order) else y

    def conv(self, eqn, perm, key, qt, x, out_dtype):
        p = eqn.params
        dn = p["dimension_numbers"]
        rhs_spec = tuple(perm[d] for d in dn.rhs_spec)
        if self.mode == "weight_only":
            return _weight_only_conv(p, dn, rhs_spec, qt, x, out_dtype)
        if qt.granularity == "channel" and qt.axis != (rhs_spec[0],):
            return None
        if p["batch_group_count"] != 1:
            return None
        dn = lax.ConvDimensionNumbers(dn.lhs_spec, rhs_spec, dn.out_spec)
        reduce_axes = tuple(i for i in range(x.ndim) if i != dn.lhs_spec[0])
        codes, scale, zero = self.activation(key, x, reduce_axes)
        return int8_conv_general_dilated(
            codes, qt.values(), p["window_strides"], p["padding"], lhs_scale=scale,
            rhs_scale=kernel_scale(qt), lhs_zero_point=zero, out_dtype=out_dtype,
            lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn, feature_group_count=p["feature_group_count"])


def _weight_only_conv(p, dn, rhs_spec, qt, x, out_dtype):
    """A 2-D convolution on an HWIO kernel as patches @ codes (`weight_only_conv`); None
    (a float convolution on the dequantized kernel) for any other convolution."""
    plain = (x.ndim == 4 and rhs_spec == (3, 2, 0, 1) and x.dtype == out_dtype
             and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
             and all(d == 1 for d in (p["lhs_dilation"] or ()))
             and all(d == 1 for d in (p["rhs_dilation"] or ())))
    if not plain:
        return None
    lhs, out = dn.lhs_spec, dn.out_spec
    x = jnp.transpose(x, (lhs[0], lhs[2], lhs[3], lhs[1]))  # NHWC
    y = weight_only_conv(x, qt, p["window_strides"], p["padding"],
                         precision=p.get("precision"))
    perm = [0] * 4
    for j, axis in enumerate((out[0], out[2], out[3], out[1])):
        perm[axis] = j
    return jnp.transpose(y, perm)


def _float_leaf(x: Any) -> Any:
    return x.dequantize() if is_qtensor(x) else x


def quantized_apply(
    model: Any,
    qvariables: Variables,
    *args: Any,
    mode: str = "weight_only",
    act_scales: str | ActScales | None = None,
    **kwargs: Any,
) -> Any:
    """Calls a linen or NNX model with quantized variables, the model's code unchanged.

    Args:
      model: a Flax linen module, or an NNX module (or graphdef). An NNX module is not
        modified: state updates made during the call (batch statistics, RNG counts) are
        discarded, as for inference.
      qvariables: linen: the variables with some leaves replaced by `QTensor` (from
        `quantize`; boxed/partitioned trees as ``init`` returns them are fine). NNX: a
        state with `QTensor` leaves, e.g. ``jol.quantize(nnx.state(module, nnx.Param))``
        (laid over the module's own state), or the full state for a graphdef.
      *args: the call's positional arguments.
      mode: ``"weight_only"`` or ``"w8a8"`` (see the module docstring).
      act_scales: for ``"w8a8"``: ``None`` or ``"dynamic"`` for dynamic per-token scales
        (per example for convolutions), or the static per-layer scales from `calibrate`.
      **kwargs: static keyword arguments of the call (``train=False``, ``method``,
        ``mutable``...).

    Returns:
      What the model call returns.

    Raises:
      ValueError: for an unknown mode, ``act_scales`` with ``"weight_only"``, static
        scales missing an intercepted layer, a model that is not a Flax module, or
        ``mode="w8a8"`` when no op of the model can run on int8 codes (no integer,
        symmetric, per-tensor or per-channel kernel is consumed by a contraction).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "weight_only" and act_scales is not None:
        raise ValueError("act_scales only applies to mode='w8a8'")
    if act_scales is None:
        act_scales = "dynamic"
    if isinstance(act_scales, str) and act_scales != "dynamic":
        raise ValueError(f"act_scales must be None, 'dynamic' or a mapping, got {act_scales!r}")
    program = flax_hooks.trace(model, qvariables, *args, **kwargs)
    leaves = program.leaves
    layers = [layer_of(path_names(p), program.api) for p in program.paths]
    hook = _Quantized(mode, act_scales, layers)
    out = flax_hooks.run(program, leaves, jax.tree.leaves(args), hook=hook,
                         float_leaf=_float_leaf)
    if mode == "w8a8" and not hook.intercepted:
        kinds = sorted({f"{x.fp8 or f'int{x.bits}'} {x.granularity}"
                        f"{'' if x.symmetric else ' asymmetric'}"
                        for x in leaves if is_qtensor(x)})
        raise ValueError(
            "quantized_apply(mode='w8a8'): no contraction of this model consumes a kernel that "
            "int8 compute can use (integer, symmetric, one scale per tensor or per output "
            f"element); the quantized leaves are: {kinds or 'none'}. Quantize the kernels with "
            "jol.quantize(..., bits=8) (per channel), or use mode='weight_only'.")
    return out
