"""Helpers of `jaxopt_lab.io`: tree <-> JSON record, JSON values, the arrays and tensor table
handed to the ``safetensors`` package."""

from __future__ import annotations

import math
import sys
import zlib
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


def encode_tree(tree: Any, tensors: list, by_type: Mapping[type, Any], node_parts: Callable,
                *, on_array: Callable | None = None) -> dict[str, Any]:
    """JSON record of ``tree``; appends ``(name, numpy array)`` for each array to ``tensors``.

    ``on_array(x, kind, name) -> record``, when given, stores each array leaf instead
    (sharded saving: only this process's shards, never the whole array).
    """
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
        if on_array is not None:
            return on_array(x, kind, name_for(prefix))
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


def decode_tree(rec: dict[str, Any], table: Mapping[str, tuple],
                by_name: Mapping[str, Any], node_build: Callable,
                *, on_array: Callable | None = None) -> Any:
    """Inverse of `encode_tree` over ``table``: ``name -> (dtype code, shape, bytes)``.

    ``on_array(record) -> array``, when given, builds each array leaf instead.
    """
    kw = {"on_array": on_array}
    t = rec["t"]
    if t == "none":
        return None
    if t == "py":
        return float(rec["float"]) if "float" in rec else rec["v"]
    if t == "array":
        return _array(rec, table) if on_array is None else on_array(rec)
    if t == "dict":
        kids = [decode_tree(c, table, by_name, node_build, **kw) for c in rec["children"]]
        if len(kids) != len(rec["keys"]):
            raise ValueError("dict record with mismatched keys and children")
        return dict(zip(rec["keys"], kids))
    if t in ("list", "tuple"):
        kids = [decode_tree(c, table, by_name, node_build, **kw) for c in rec["children"]]
        return kids if t == "list" else tuple(kids)
    if t == "node":
        if rec["name"] not in by_name:
            raise ValueError(f"unknown node type {rec['name']!r}; register it with "
                             "jaxopt_lab.io.register_node before loading")
        kids = [decode_tree(c, table, by_name, node_build, **kw) for c in rec["children"]]
        return node_build(rec["name"], from_json(rec["aux"]), list(rec["names"]), kids)
    raise ValueError(f"unknown record type {t!r}")


def _array(rec: dict[str, Any], table: Mapping[str, tuple]) -> Any:
    if rec["name"] not in table:
        raise ValueError(f"tensor {rec['name']!r} is missing from the file")
    code, shape, buf = table[rec["name"]]
    dtype, want_shape = jnp.dtype(rec["dtype"]), tuple(rec["shape"])
    stored = np.dtype(jnp.dtype(ST_DTYPES[code]))
    if len(buf) != math.prod(shape) * stored.itemsize:
        raise ValueError(f"tensor {rec['name']!r}: {len(buf)} bytes do not fit shape {shape}")
    arr = np.frombuffer(buf, stored, math.prod(shape))
    if _CODES.get(dtype.name) == code:
        if shape != want_shape:
            raise ValueError(f"tensor {rec['name']!r} has shape {shape}, record says "
                             f"{want_shape}")
        arr = arr.reshape(shape)
    elif code == "U8" and math.prod(want_shape) * dtype.itemsize == len(buf):
        arr = arr.view(dtype).reshape(want_shape)  # raw bytes of a dtype safetensors lacks
    else:
        raise ValueError(f"tensor {rec['name']!r} is {code} {shape}, record says "
                         f"{dtype.name} {want_shape}")
    if sys.byteorder != "little":  # pragma: no cover
        arr = arr.astype(arr.dtype.newbyteorder("<")).astype(arr.dtype.newbyteorder("="))
    if rec["kind"] == "jax":
        return jnp.asarray(arr)
    return arr[()] if rec["kind"] == "npscalar" else arr


# --- what the safetensors package writes ---------------------------------------------


def storage_arrays(tensors: list[tuple[str, np.ndarray]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """What the ``safetensors`` package writes for each array, and the tensor table.

    Arrays become C-contiguous little-endian; a dtype without a safetensors code (``int4``,
    complex...) becomes its raw bytes as a 1-D ``uint8`` array. The table is
    ``name -> {"dtype": code, "shape": shape}``: the layout (order and offsets) is the
    package's choice, so nothing here depends on it.
    """
    arrays, table = {}, {}
    for name, arr in tensors:
        arr = np.require(arr, requirements="C")  # ascontiguousarray would make 0-d 1-d
        if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian input
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        code = _CODES.get(arr.dtype.name)
        if code is None:
            arr = arr.reshape(-1).view(np.uint8)
        arrays[name] = arr
        table[name] = {"dtype": code or "U8", "shape": list(arr.shape)}
    return arrays, table


def crc32(arr: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order)."""
    return zlib.crc32(np.require(arr, requirements="C").reshape(-1).view(np.uint8))
