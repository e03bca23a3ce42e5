"""Helpers of `jaxopt_lab.io`: tree <-> JSON record, JSON values, safetensors tensor table."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# safetensors dtype codes; any other dtype is stored as raw U8 bytes.
ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_CODES = {v: k for k, v in ST_DTYPES.items()}


# --- JSON values (user metadata, node aux data) ---------------------------------------


def to_json(x: Any, where: str) -> Any:
    """JSON-able form of ``x`` that `from_json` turns back into an equal value."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else {"__float__": repr(float(x))}
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        return {"__dtype__": np.dtype(x).name}
    if isinstance(x, tuple):
        return {"__tuple__": [to_json(v, where) for v in x]}
    if isinstance(x, list):
        return [to_json(v, where) for v in x]
    if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
        return {k: to_json(v, where) for k, v in x.items()}
    raise TypeError(f"{where}: {type(x).__name__} value {x!r} is not JSON-serialisable")


def from_json(x: Any) -> Any:
    if isinstance(x, list):
        return [from_json(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(from_json(v) for v in x["__tuple__"])
        if set(x) == {"__dtype__"}:
            return jnp.dtype(x["__dtype__"])
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        return {k: from_json(v) for k, v in x.items()}
    return x


# --- tree <-> record -------------------------------------------------------------------


def encode_tree(tree: Any, tensors: list, by_type: Mapping[type, Any], node_parts: Callable
                ) -> dict[str, Any]:
    """JSON record of ``tree``; appends ``(name, numpy array)`` for each array to ``tensors``."""
    used: set[str] = set()

    def name_for(prefix: str) -> str:
        name, i = prefix or "root", 1
        while name in used:
            name, i = f"{prefix or 'root'}~{i}", i + 1
        used.add(name)
        return name

    def array(x: Any, kind: str, prefix: str) -> dict[str, Any]:
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"{prefix or '<root>'}: cannot save a traced value; call save "
                            "outside jit/vmap")
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - e.g. typed PRNG keys
            raise TypeError(f"{prefix or '<root>'}: cannot save {type(x).__name__}: {e}") from None
        if arr.dtype == object:
            raise TypeError(f"{prefix or '<root>'}: cannot save an object array")
        name = name_for(prefix)
        tensors.append((name, arr))
        return {"t": "array", "name": name, "kind": kind, "dtype": arr.dtype.name,
                "shape": list(arr.shape)}

    def enc(x: Any, prefix: str) -> dict[str, Any]:
        join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
        if x is None:
            return {"t": "none"}
        if type(x) in by_type:
            names, children, aux = node_parts(x, by_type[type(x)])
            return {"t": "node", "name": by_type[type(x)][0], "names": names,
                    "aux": to_json(aux, prefix or "<root>"),
                    "children": [enc(c, join(n)) for n, c in zip(names, children)]}
        if isinstance(x, jax.Array):
            return array(x, "jax", prefix)
        if isinstance(x, np.ndarray):
            return array(x, "numpy", prefix)
        if isinstance(x, np.generic):
            return array(x, "npscalar", prefix)
        if isinstance(x, (bool, int, str)):
            return {"t": "py", "v": x}
        if isinstance(x, float):
            return {"t": "py", "float": repr(x)}
        if type(x) is dict:
            bad = [k for k in x if isinstance(k, bool) or not isinstance(k, (str, int))]
            if bad:
                raise TypeError(f"{prefix or '<root>'}: dict keys must be str or int, "
                                f"got {bad[0]!r}")
            return {"t": "dict", "keys": list(x),
                    "children": [enc(v, join(k)) for k, v in x.items()]}
        if type(x) in (list, tuple):
            return {"t": type(x).__name__,
                    "children": [enc(v, join(i)) for i, v in enumerate(x)]}
        raise TypeError(f"{prefix or '<root>'}: cannot save a {type(x).__module__}."
                        f"{type(x).__qualname__}; register it with jaxopt_lab.io.register_node")

    return enc(tree, "")


def decode_tree(rec: dict[str, Any], table: Mapping[str, tuple], data: bytearray,
                by_name: Mapping[str, Any], node_build: Callable) -> Any:
    """Inverse of `encode_tree` over the validated tensor ``table`` and the data bytes."""
    t = rec["t"]
    if t == "none":
        return None
    if t == "py":
        return float(rec["float"]) if "float" in rec else rec["v"]
    if t == "array":
        return _array(rec, table, data)
    if t == "dict":
        kids = [decode_tree(c, table, data, by_name, node_build) for c in rec["children"]]
        if len(kids) != len(rec["keys"]):
            raise ValueError("dict record with mismatched keys and children")
        return dict(zip(rec["keys"], kids))
    if t in ("list", "tuple"):
        kids = [decode_tree(c, table, data, by_name, node_build) for c in rec["children"]]
        return kids if t == "list" else tuple(kids)
    if t == "node":
        if rec["name"] not in by_name:
            raise ValueError(f"unknown node type {rec['name']!r}; register it with "
                             "jaxopt_lab.io.register_node before loading")
        kids = [decode_tree(c, table, data, by_name, node_build) for c in rec["children"]]
        return node_build(rec["name"], from_json(rec["aux"]), list(rec["names"]), kids)
    raise ValueError(f"unknown record type {t!r}")


def _array(rec: dict[str, Any], table: Mapping[str, tuple], data: bytearray) -> Any:
    code, shape, begin, end = table[rec["name"]]
    dtype, want_shape = jnp.dtype(rec["dtype"]), tuple(rec["shape"])
    arr = np.frombuffer(data, np.dtype(jnp.dtype(ST_DTYPES[code])), math.prod(shape), begin)
    if _CODES.get(dtype.name) == code:
        if shape != want_shape:
            raise ValueError(f"tensor {rec['name']!r} has shape {shape}, record says "
                             f"{want_shape}")
        arr = arr.reshape(shape)
    elif code == "U8" and math.prod(want_shape) * dtype.itemsize == end - begin:
        arr = arr.view(dtype).reshape(want_shape)  # raw bytes of a dtype safetensors lacks
    else:
        raise ValueError(f"tensor {rec['name']!r} is {code} {shape}, record says "
                         f"{dtype.name} {want_shape}")
    if sys.byteorder != "little":  # pragma: no cover
        arr = arr.astype(arr.dtype.newbyteorder("<")).astype(arr.dtype.newbyteorder("="))
    if rec["kind"] == "jax":
        return jnp.asarray(arr)
    return arr[()] if rec["kind"] == "npscalar" else arr


# --- safetensors tensor table ----------------------------------------------------------


def safetensors_header(tensors: list[tuple[str, np.ndarray]]
                       ) -> tuple[dict[str, Any], list[memoryview]]:
    """Tensor table and the little-endian byte blobs, in file order."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, arr in tensors:
        arr = np.require(arr, requirements="C")  # ascontiguousarray would make 0-d 1-d
        if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian input
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        code = _CODES.get(arr.dtype.name)
        blob = arr.reshape(-1).view(np.uint8)
        shape = list(arr.shape) if code else [blob.size]
        header[name] = {"dtype": code or "U8", "shape": shape,
                        "data_offsets": [offset, offset + blob.size]}
        blobs.append(memoryview(blob))
        offset += blob.size
    return header, blobs


def check_table(header: Mapping[str, Any], data_len: int) -> dict[str, tuple]:
    """Validates the tensor table against ``data_len``: ``name -> (code, shape, begin, end)``."""
    table, spans = {}, []
    for name, e in header.items():
        try:
            code, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"bad entry for tensor {name!r}: {e!r}") from None
        if code not in ST_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {code!r}")
        ok_ints = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        itemsize = np.dtype(jnp.dtype(ST_DTYPES[code])).itemsize
        if not ok_ints or end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {name!r}: offsets {[begin, end]} do not fit shape {shape}")
        table[name] = (code, shape, begin, end)
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError(f"tensor data not contiguous at byte {pos}")
        pos = end
    if pos != data_len:
        raise ValueError(f"tensor data ends at byte {pos} but the file holds {data_len} bytes")
    return table
