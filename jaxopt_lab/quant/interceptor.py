"""Run an unchanged Flax linen model with quantized weights, via ``nn.intercept_methods``.

`quantized_apply(model, qvariables, *args, mode=...)` replaces ``model.apply``:

* ``mode="weight_only"``: the model runs in float on its dequantized weights. Every
  ``nn.Dense`` and ``nn.DenseGeneral`` whose ``kernel`` is an integer `QTensor` with one
  scale per tensor or per output channel contracts its input through
  `weight_only_dot_general` (on CPU a native kernel dequantizes the codes panel by panel
  inside the matmul, so the dequantized kernel is never written out); every other
  `QTensor` is dequantized on the fly. The result equals
  ``model.apply(jol.dequantize(qvariables), ...)`` up to summation order (bit for bit
  with the native kernel off, `use_native_int8(False)`).
* ``mode="w8a8"``: the ``__call__`` of every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``
  and ``nn.Einsum`` whose ``kernel`` is an integer `QTensor` with one scale per tensor or
  per output channel is intercepted: its input is quantized to int8 -- with static
  calibrated scales (``act_scales`` from `calibrate`) or dynamic per-token scales
  (``act_scales="dynamic"``) -- and the layer computes int8 x int8 -> int32 with the
  kernel's integer codes (see `jaxopt_lab.quant.int8_ops`), rescaled to float. Everything
  else (biases, norms, other layers, group-wise or fp8 kernels, masked convolutions) runs in
  float on dequantized values.

Dense, DenseGeneral and Conv run their own ``__call__`` (padding, reshapes, bias...) with
their ``dot_general`` / ``conv_general_dilated`` hook pointed at the int8 op for the
duration of the call; Einsum, which has no hook, is re-expressed with the same steps.
The model's code is never edited. Layers are keyed by their module path joined with
``/`` (e.g. ``"Dense_0"``, ``"Block_0/Conv_1"``).

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

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.quant.core import dequantize
from jaxopt_lab.quant.int8_ops import (
    int8_conv_general_dilated,
    int8_dot_general,
    int8_einsum,
    parse_einsum,
    quantize_activations,
    quantize_with,
    weight_only_dot_general,
)
from jaxopt_lab.quant.qtensor import QTensor, is_qtensor

Variables = Any
ActScales = Mapping[str, tuple[jax.Array, jax.Array | None]]
MODES = ("weight_only", "w8a8")
INTERCEPTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)


def layer_key(module: nn.Module) -> str:
    """The key of a layer in activation statistics and scales: its path joined by ``/``."""
    return "/".join(str(p) for p in module.path)


def is_intercepted(module: nn.Module) -> bool:
    """Exactly these layer types (not subclasses, whose ``__call__`` may differ)."""
    return type(module) in INTERCEPTED


def integer_kernels(qvariables: Variables) -> dict[str, QTensor]:
    """``{layer key: kernel}`` for the ``params/.../kernel`` QTensors usable by int8 compute.

    Usable: integer codes (not fp8), symmetric, one scale per tensor or per channel, no
    stacked batch axes.
    """
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(qvariables, is_leaf=is_qtensor)[0]
    for path, leaf in flat:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if (not is_qtensor(leaf) or len(names) < 2 or names[0] != "params"
                or names[-1] != "kernel" or leaf.fp8 is not None or not leaf.symmetric
                or leaf.granularity not in ("tensor", "channel")
                or jnp.ndim(leaf.qvalue) != len(leaf.storage_shape)):
            continue
        out["/".join(str(n) for n in names[1:-1])] = leaf
    return out


def kernel_scale(qt: QTensor) -> jax.Array:
    """The kernel's scale in keepdims form (scalar or size ``C`` on the channel axis)."""
    scale = jnp.asarray(qt.scale, jnp.float32)
    if qt.granularity == "tensor":
        return scale.reshape(())
    return scale.reshape(tuple(qt.shape[i] if i in qt.axis else 1 for i in range(qt.ndim)))


def _scale_factors_out(qt: QTensor, rhs: jax.Array, contracted) -> bool:
    """Whether the layer contracts the kernel as stored, with its scale off the contraction."""
    return (tuple(rhs.shape) == qt.shape
            and not set(qt.axis or ()) & {a % rhs.ndim for a in contracted})


@contextlib.contextmanager
def _hooked(module: nn.Module, **attrs: Any):
    """Temporarily points a bound layer's op hooks (frozen dataclass fields) elsewhere."""
    old = {k: getattr(module, k) for k in attrs}
    try:
        for k, v in attrs.items():
            object.__setattr__(module, k, v)
        yield
    finally:
        for k, v in old.items():
            object.__setattr__(module, k, v)


class _WeightOnly:
    """The weight-only interceptor: Dense layers contract with integer codes, then scale."""

    def __init__(self, kernels: Mapping[str, QTensor]):
        self.kernels = kernels

    def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
        module = context.module
        qt = None
        if context.method_name == "__call__" and type(module) in (nn.Dense, nn.DenseGeneral):
            qt = self.kernels.get(layer_key(module))
        if qt is None:
            return next_fun(*args, **kwargs)
        with _hooked(module, dot_general=self.dot_hook(qt), dot_general_cls=None):
            return next_fun(*args, **kwargs)

    @staticmethod
    def dot_hook(qt: QTensor) -> Callable:
        def dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **unused):
            (_, rc), _ = dimension_numbers
            if not _scale_factors_out(qt, rhs, rc) or rhs.dtype != lhs.dtype:
                return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
            return weight_only_dot_general(lhs, qt.values(), dimension_numbers,
                                           rhs_scale=kernel_scale(qt), precision=precision,
                                           preferred_element_type=preferred_element_type)
        return dot_general


class _W8A8:
    """The interceptor: per-layer int8 compute with static or dynamic activation scales."""

    def __init__(self, kernels: Mapping[str, QTensor], act_scales: str | ActScales):
        self.kernels, self.act_scales = kernels, act_scales

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

    def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
        module = context.module
        if context.method_name != "__call__" or not is_intercepted(module):
            return next_fun(*args, **kwargs)
        key = layer_key(module)
        qt = self.kernels.get(key)
        if qt is None:
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Einsum):
            return self.einsum(module, key, qt, next_fun, args, kwargs)
        if isinstance(module, nn.Conv):
            if module.mask is not None:
                return next_fun(*args, **kwargs)
            hook = self.conv_hook(key, qt)
            with _hooked(module, conv_general_dilated=hook, conv_general_dilated_cls=None):
                return next_fun(*args, **kwargs)
        with _hooked(module, dot_general=self.dot_hook(key, qt), dot_general_cls=None):
            return next_fun(*args, **kwargs)

    def dot_hook(self, key: str, qt: QTensor) -> Callable:
        def dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **unused):
            (lc, rc), _ = dimension_numbers
            if not _scale_factors_out(qt, rhs, rc):
                return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
            codes, scale, zero = self.activation(key, lhs, tuple(a % lhs.ndim for a in lc))
            return int8_dot_general(codes, qt.values(), dimension_numbers, lhs_scale=scale,
                                    rhs_scale=kernel_scale(qt), lhs_zero_point=zero,
                                    out_dtype=lhs.dtype)
        return dot_general

    def conv_hook(self, key: str, qt: QTensor) -> Callable:
        def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None,
                                 feature_group_count=1, precision=None, **unused):
            dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            reduce_axes = tuple(i for i in range(lhs.ndim) if i != dn.lhs_spec[0])
            conv = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                        dimension_numbers=dn, feature_group_count=feature_group_count)
            channel_ok = qt.granularity == "tensor" or qt.axis == (dn.rhs_spec[0],)
            if tuple(rhs.shape) != qt.shape or not channel_ok:
                return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                                precision=precision, **conv)
            codes, scale, zero = self.activation(key, lhs, reduce_axes)
            return int8_conv_general_dilated(codes, qt.values(), window_strides, padding,
                                             lhs_scale=scale, rhs_scale=kernel_scale(qt),
                                             lhs_zero_point=zero, out_dtype=lhs.dtype, **conv)
        return conv_general_dilated

    def einsum(self, module: nn.Einsum, key: str, qt: QTensor, next_fun, args, kwargs):
        """``nn.Einsum.__call__`` with the contraction in int8 (same steps as Flax)."""
        inputs = args[0] if args else kwargs["inputs"]
        spec = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        spec = nn.module.merge_param("einsum_str", module.einsum_str, spec).replace(" ", "")
        try:
            a, b, out = parse_einsum(spec, jnp.ndim(inputs), len(qt.shape))
        except ValueError:
            return next_fun(*args, **kwargs)  # Flax raises its own error, or it runs in float
        if qt.granularity == "channel" and any(b[a] not in out for a in qt.axis):
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        if tuple(jnp.shape(kernel)) != tuple(module.shape):
            return next_fun(*args, **kwargs)  # let Flax report the shape mismatch
        inputs, _, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
        reduce_axes = tuple(i for i, c in enumerate(a) if c not in out)
        codes, scale, zero = self.activation(key, inputs, reduce_axes)
        y = int8_einsum(f"{a},{b}->{out}", codes, qt.values(), lhs_scale=scale,
                        rhs_scale=kernel_scale(qt), lhs_zero_point=zero, out_dtype=inputs.dtype)
        if bias is not None:
            sizes = {c: qt.shape[i] for i, c in enumerate(b)}
            y = y + jnp.reshape(bias, tuple(sizes[c] if c in b else 1 for c in out))
        return y


def quantized_apply(
    model: nn.Module,
    qvariables: Variables,
    *args: Any,
    mode: str = "weight_only",
    act_scales: str | ActScales | None = None,
    **kwargs: Any,
) -> Any:
    """``model.apply`` with quantized variables, the model's code unchanged.

    Args:
      model: a Flax linen module.
      qvariables: its variables with some leaves replaced by `QTensor` (from `quantize`).
      *args: positional arguments of ``model.apply`` after the variables.
      mode: ``"weight_only"`` (float compute on the integer codes or dequantized weights)
        or ``"w8a8"`` (int8 weights and activations in Dense, DenseGeneral, Conv and
        Einsum layers).
      act_scales: for ``"w8a8"``: ``None`` or ``"dynamic"`` for dynamic per-token scales
        (per example for convolutions), or the static per-layer scales from `calibrate`.
      **kwargs: keyword arguments of ``model.apply`` (``train=False``, ``method``,
        ``mutable``...).

    Returns:
      What ``model.apply`` returns.

    Raises:
      ValueError: for an unknown mode, ``act_scales`` with ``"weight_only"``, or static
        scales missing an intercepted layer.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    floats = dequantize(qvariables)  # stand-ins; under jit the hooked layers' copies are dead
    if mode == "weight_only":
        if act_scales is not None:
            raise ValueError("act_scales only applies to mode='w8a8'")
        with nn.intercept_methods(_WeightOnly(integer_kernels(qvariables))):
            return model.apply(floats, *args, **kwargs)
    if act_scales is None:
        act_scales = "dynamic"
    if isinstance(act_scales, str) and act_scales != "dynamic":
        raise ValueError(f"act_scales must be None, 'dynamic' or a mapping, got {act_scales!r}")
    with nn.intercept_methods(_W8A8(integer_kernels(qvariables), act_scales)):
        return model.apply(floats, *args, **kwargs)
