"""Eager `quantize` of concrete leaves: one compiled program for leaves of any shape.

Jitting `jaxopt_lab.quant.core.quantize_array` compiles one XLA program per leaf shape and
settings: the first `quantize` of a three-layer MLP compiled three programs (1.3-3.8 s
measured, almost all of it XLA compilation), and every new model paid again.

Here the per-slice ranges (min and max over each scale's slice) are reduced on the host
with NumPy, where the finiteness check already brings every leaf, and the heavy part,
`jaxopt_lab.quant.codes.codes_from_range` (scale, zero point, codes), which is elementwise
once each element carries its slice's range, runs on all small leaves at once: their
elements concatenated into one flat buffer padded to a power of two. Its program is
compiled once per (bucket length, settings) and reused by every later tree, whatever its
shapes. The codes, scales and zero points are the same bit for bit as
`jaxopt_lab.quant.core.quantize_array`'s (min/max are exact in any order, and the
elementwise arithmetic is the same function); tests/test_quant_eager.py checks it.

Leaves that are traced, sharded over several devices, large (more than
``MAX_LEAF_ELEMENTS``) or hold float32 subnormals keep the per-leaf compiled path: under
``jit`` nothing changes, for big arrays the compile is small next to the work and host
copies would cost more, and subnormals are flushed to zero by XLA in some fused contexts
and not in others, so only the per-leaf program reproduces itself on them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.quant.codes import codes_from_range, grouped
from jaxopt_lab.quant.qtensor import QTensor, pack

MAX_LEAF_ELEMENTS = 1 << 20  # larger leaves: the per-leaf program (compile << work)
MAX_BATCH_ELEMENTS = 1 << 22  # one program call holds at most this many elements
MIN_BUCKET = 1 << 12  # small trees share one bucket length (and so one program)
_STATIC = ("bits", "symmetric", "dtype", "scale_dtype")
_TINY = np.finfo(np.float32).tiny


@dataclasses.dataclass(frozen=True)
class Slot:
    """Stands for the `QTensor` of pending leaf ``index`` until the batch has run."""

    index: int


def batchable(leaf: Any) -> bool:
    """True when ``leaf`` is concrete, on at most one device and small enough to batch."""
    if isinstance(leaf, jax.core.Tracer):
        return False
    if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) != 1:
        return False
    if int(np.prod(np.shape(leaf))) > MAX_LEAF_ELEMENTS:
        return False
    # XLA on CPU treats float32 subnormals as zero in some fused contexts and not in others,
    # so a leaf holding any would not be quantized bit for bit as the per-leaf program does.
    a = np.abs(np.asarray(leaf).astype(np.float32))
    return not np.any((a > 0) & (a < _TINY))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _flat_codes(x, lo, hi, **static):
    """`codes_from_range` on flat buffers: per element codes, scale, zero point."""
    f32 = jnp.float32
    return codes_from_range(x.astype(f32), lo.astype(f32), hi.astype(f32), static)


@dataclasses.dataclass
class _Leaf:
    leaf: Any
    settings: Mapping[str, Any]
    view_shape: tuple[int, ...] = ()
    red: tuple[int, ...] = ()
    offset: int = 0


def quantize_leaves(pending: Sequence[tuple[Any, Mapping[str, Any]]]) -> list[QTensor]:
    """QTensors of ``(leaf, settings)`` pairs (settings from `leaf_settings`), in order.

    Leaves sharing the static settings run through one `_flat_codes` call per batch of at
    most ``MAX_BATCH_ELEMENTS`` elements.
    """
    results: list[Any] = [None] * len(pending)
    groups: dict[tuple, list[tuple[int, _Leaf]]] = {}
    for i, (leaf, s) in enumerate(pending):
        # One flat buffer per input dtype too: the float32 conversion happens in the program,
        # as XLA does it (it flushes bfloat16/float16 subnormals to zero; NumPy does not).
        key = tuple((k, _static_value(k, s[k])) for k in _STATIC) + (_host(leaf).dtype,)
        groups.setdefault(key, []).append((i, _Leaf(leaf, s)))
    for key, items in groups.items():
        batch: list[tuple[int, _Leaf]] = []
        size = 0
        for item in items:
            n = int(np.prod(np.shape(item[1].leaf)))
            if batch and size + n > MAX_BATCH_ELEMENTS:
                _run(batch, dict(key[:-1]), results)
                batch, size = [], 0
            batch.append(item)
            size += n
        _run(batch, dict(key[:-1]), results)
    return results


def _host(leaf: Any) -> np.ndarray:
    """The leaf on the host, in the dtype ``jnp.asarray`` gives it (float64 -> float32
    without jax_enable_x64, converted on the host as ``jnp.asarray`` does)."""
    x = np.asarray(leaf)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def _static_value(key: str, value: Any) -> Any:
    # jit's static arguments must hash alike for equal settings ("float32" vs jnp.float32).
    if key in ("dtype", "scale_dtype") and value is not None:
        return jnp.dtype(value).name
    return value


def _run(batch: list[tuple[int, _Leaf]], static: dict[str, Any], results: list) -> None:
    xs, los, his = [], [], []
    offset = 0
    for _, item in batch:
        # Ranges in the leaf's own dtype: its conversion to float32 in the program is
        # monotonic, so converting the min/max there gives the min/max of the converted.
        view, red = grouped(_host(item.leaf), item.settings)
        lo = np.broadcast_to(view.min(axis=red, keepdims=True), view.shape)
        hi = np.broadcast_to(view.max(axis=red, keepdims=True), view.shape)
        xs.append(view.ravel())
        los.append(lo.ravel())
        his.append(hi.ravel())
        item.view_shape, item.red, item.offset = view.shape, red, offset
        offset += view.size
    bucket = max(MIN_BUCKET, 1 << (offset - 1).bit_length())
    pad = np.zeros(bucket - offset, xs[0].dtype)  # a zero range quantizes to zero codes
    x, lo, hi = (np.concatenate(parts + [pad]) for parts in (xs, los, his))
    codes, scale, zero = jax.device_get(_flat_codes(x, lo, hi, **static))
    for index, item in batch:
        results[index] = _qtensor(item, codes, scale, zero)


def _first_of_each_slice(flat: np.ndarray, item: _Leaf) -> np.ndarray:
    """The keepdims per-slice value (every element of a slice holds the same one)."""
    n = int(np.prod(item.view_shape))
    view = flat[item.offset:item.offset + n].reshape(item.view_shape)
    return view[tuple(slice(0, 1) if a in item.red else slice(None)
                      for a in range(len(item.view_shape)))]


def _stored(param: np.ndarray, shape: tuple[int, ...], s: Mapping[str, Any]) -> np.ndarray:
    """NumPy twin of `jaxopt_lab.quant.core._stored` (keepdims form -> QTensor layout)."""
    if s["granularity"] == "tensor":
        return param.reshape(())
    if s["granularity"] == "channel":
        return param.reshape(tuple(shape[a] for a in s["axis"]))
    return np.squeeze(param, s["group_axis"][0] + 1)


def _qtensor(item: _Leaf, codes: np.ndarray, scale: np.ndarray, zero: Any) -> QTensor:
    s, leaf = item.settings, item.leaf
    shape = tuple(np.shape(leaf))
    n = int(np.prod(item.view_shape))
    # Committed like the per-leaf program's outputs: to the leaf's device only when the leaf
    # is committed (an uncommitted result may move, e.g. into a pmap over other devices).
    device = None
    if isinstance(leaf, jax.Array) and getattr(leaf, "committed", True):
        device = next(iter(leaf.devices()))

    def put(a: np.ndarray) -> jax.Array:
        return jax.device_put(np.array(a, copy=True), device)  # not a view of XLA memory

    leaf_codes = codes[item.offset:item.offset + n].reshape(shape or (1,))
    leaf_scale = _stored(_first_of_each_slice(scale, item), shape, s)
    leaf_scale = leaf_scale.astype(jnp.dtype(s["scale_dtype"]))  # exact: rounded already
    # The dtype jnp.asarray(leaf) has: float64 input becomes float32 without jax_enable_x64.
    meta = dict(shape=shape, dtype=jax.dtypes.canonicalize_dtype(leaf.dtype),
                granularity=s["granularity"], axis=s["axis"], group_axis=s["group_axis"],
                group_size=None if s["group_axis"] is None else s["group_size"])
    if s["dtype"] is not None:
        return QTensor(put(leaf_codes), put(leaf_scale), None, bits=8,
                       fp8=jnp.dtype(s["dtype"]).name, **meta)
    leaf_zero = None
    if zero is not None:
        leaf_zero = put(_stored(_first_of_each_slice(zero, item), shape, s))
    packed = put(leaf_codes) if s["bits"] == 8 else pack(put(leaf_codes), s["bits"])
    return QTensor(packed, put(leaf_scale), leaf_zero, bits=s["bits"], **meta)


def fill(tree: Any, results: Sequence[Any], is_leaf) -> Any:
    """``tree`` with every `Slot` replaced by its result (other leaves untouched)."""
    if isinstance(tree, Slot):
        return results[tree.index]
    leaves, treedef = jax.tree.flatten(
        tree, is_leaf=lambda x: isinstance(x, Slot) or is_leaf(x))
    return jax.tree.unflatten(
        treedef, [results[x.index] if isinstance(x, Slot) else x for x in leaves])


__all__ = ("MAX_LEAF_ELEMENTS", "Slot", "batchable", "fill", "quantize_leaves")
