"""Sharded artifacts: one safetensors file per process plus an index, loadable onto any mesh.

Layout of the artifact directory::

    index.json                                   tree record, user metadata, file list
    shard-1a2b3c4d-00000-of-00002.safetensors    the chunks process 0's devices hold
    shard-1a2b3c4d-00001-of-00002.safetensors    ...

The shard files are named by their save's id (``1a2b3c4d``), so a save into an existing
artifact never replaces the files its index lists: the index, written last and renamed
into place atomically, switches from the old files to the new ones, and only then are
the old ones removed. A save that dies before its index is written (a killed process, a
full disk) leaves the previous artifact loadable as it was, or, in a new directory, no
index, which `load_sharded` refuses by name.

Each process writes only the shards its own devices hold, one copy of each (replica 0),
copied from the device buffers, so no host ever holds the whole tree. A chunk is one
tensor named ``<leaf>@<start>:<stop>,...``; the file's metadata gives its leaf, global
index, dtype and CRC32. Host leaves (numpy arrays and scalars) are stored whole by
process 0. Every file and the index carry one random save id, so files of different saves
never mix. Loading builds each array with ``jax.make_array_from_callback``: every local
device asks for its slice under the requested sharding, cut from the chunks that overlap
it, so a process reads only what its devices need, onto the same or a different mesh.

Not orbax (which `jaxopt_lab.train.Checkpointer` uses): orbax restores onto a target tree,
and a `QTensor`'s metadata (bits, granularity, logical shape) lives in its tree structure,
which orbax does not store; its data files carry no checksum to name a corrupted one; and
these files stay plain safetensors, readable without orbax.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy

from jaxopt_lab import _serial
from jaxopt_lab import io as _io

Params = Any
INDEX = "index.json"
FORMAT = "jaxopt_lab.sharded"
VERSION = 1
_SHARD_FORMAT = "jaxopt_lab.shard"
# Dtypes ``safe_open(..., framework="numpy")`` returns as themselves; others go as raw bytes.
_TYPED = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                    "int64", "float16", "bfloat16", "float32", "float64"})
ShardingsArg = (jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]
                | Callable[[str, tuple, np.dtype], Any] | None)


def _file_name(save_id: int, process: int, count: int) -> str:
    return f"shard-{save_id:08x}-{process:05d}-of-{count:05d}.safetensors"


# Shard files of any save (this version's and the first one's names) and the hidden
# temporaries `jaxopt_lab.io.write_atomic` leaves when its process is killed mid-write.
_OURS = re.compile(r"(shard-([0-9a-f]{8}-)?\d{5}-of-\d{5}\.safetensors)"
                   r"|(\.(shard-[-0-9a-f]+-of-\d{5}\.safetensors|index\.json)\.[0-9a-f]{8}\.tmp)")


def _remove_stale(directory: str, keep: set[str]) -> None:
    """Removes shard files no longer listed in the index, and dead saves' temporaries.

    Runs after every process's files and the new index are in place, so what it removes
    belongs to an earlier save (replaced, or killed before its index was written).
    Best effort: a file it cannot remove only costs space, never correctness.
    """
    for name in os.listdir(directory):
        if name not in keep and _OURS.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _box(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    """``[[start, stop], ...]`` of a tuple of slices over ``shape``."""
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        out.append([start, stop])
    return out + [[0, n] for n in shape[len(index):]]


def _spec_json(sharding: Any) -> dict[str, Any] | None:
    """The saved sharding of a ``NamedSharding`` over concrete devices, as JSON."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    spec = [list(e) if isinstance(e, tuple) else e for e in sharding.spec]
    return {"axes": list(mesh.axis_names), "shape": list(mesh.devices.shape),
            "devices": [int(d.id) for d in mesh.devices.flat], "spec": spec}


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _save_id() -> int:
    token = np.int32(secrets.randbits(31))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return int(token)


def save_sharded(directory: str | os.PathLike, tree: Params, *,
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Writes ``tree`` as a sharded artifact: one file per process plus ``index.json``.

    Call it on every process (it synchronises them). Each process copies only the
    shards its devices hold, so no host materialises the whole tree. Saving over an
    existing artifact switches to the new one when the index is replaced, last: a save
    that dies before that leaves the previous artifact loadable, and the next complete
    save removes the dead one's files.

    Args:
      directory: the artifact directory (created if missing).
      tree: a pytree as for `jaxopt_lab.save`; jax arrays may be sharded over any mesh,
        across processes.
      metadata: optional JSON-serialisable mapping, returned by `load_sharded`.

    Raises:
      TypeError: naming a leaf that cannot be stored.
      OSError: a write failed (naming the file; see `jaxopt_lab.save`).

    Examples:
      >>> import tempfile, jax.numpy as jnp, jaxopt_lab as jol
      >>> d = tempfile.mkdtemp()
      >>> jol.save_sharded(d, {"w": jnp.arange(4.0)})
      >>> jol.load_sharded(d)["w"].tolist()
      [0.0, 1.0, 2.0, 3.0]
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    process, count = jax.process_index(), jax.process_count()
    save_id = _save_id()
    arrays: dict[str, np.ndarray] = {}
    chunks: dict[str, dict[str, Any]] = {}

    def add(leaf: str, box: list[list[int]], arr: np.ndarray) -> None:
        arr = np.require(arr, requirements="C")
        key = f"{leaf}@" + ",".join(f"{a}:{b}" for a, b in box)
        stored = arr if arr.dtype.name in _TYPED else arr.reshape(-1).view(np.uint8)
        arrays[key] = stored
        chunks[key] = {"leaf": leaf, "index": box, "dtype": arr.dtype.name,
                       "crc32": _serial.crc32(stored)}

    def on_array(x: Any, kind: str, name: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"t": "array", "name": name, "kind": kind}
        if isinstance(x, jax.Array):
            shape = tuple(x.shape)
            for shard in x.addressable_shards:
                if shard.replica_id == 0:  # one copy of each distinct shard, globally
                    add(name, _box(shard.index, shape), np.asarray(shard.data))
            rec["sharding"] = _spec_json(x.sharding)
            dtype = np.dtype(x.dtype)
        else:
            arr = np.asarray(x)
            if arr.dtype == object:
                raise TypeError(f"{name}: cannot save an object array")
            shape, dtype = arr.shape, arr.dtype
            if process == 0:
                add(name, [[0, n] for n in shape], arr)
        rec.update(dtype=dtype.name, shape=list(shape))
        return rec

    spec = _serial.encode_tree(tree, [], _io.BY_TYPE, _io.node_parts, on_array=on_array)
    user = _serial.to_json(metadata or {}, "metadata")
    info = {"version": VERSION, "save_id": save_id, "process": process, "chunks": chunks}
    name = os.path.join(directory, _file_name(save_id, process, count))
    try:
        raw = safetensors.numpy.save(arrays, metadata={"format": _SHARD_FORMAT,
                                                       _SHARD_FORMAT: json.dumps(info)})
    except (safetensors.SafetensorError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot save, safetensors refused the tensors: {e}") from None
    _io.write_atomic(name, raw)
    _sync("jaxopt_lab.save_sharded.files")  # every file is in place before the index
    if process == 0:
        files = [_file_name(save_id, p, count) for p in range(count)]
        index = {"format": FORMAT, "version": VERSION, "save_id": save_id, "tree": spec,
                 "metadata": user, "files": files}
        index["crc32"] = _index_crc(index)
        _io.write_atomic(os.path.join(directory, INDEX), json.dumps(index).encode())
        _remove_stale(directory, set(files) | {INDEX})
    _sync("jaxopt_lab.save_sharded.index")


def _index_crc(index: Mapping[str, Any]) -> int:
    rest = {k: v for k, v in index.items() if k != "crc32"}
    return zlib.crc32(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def _read_index(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, INDEX)
    if not os.path.isdir(directory):
        raise _io.CheckpointNotFoundError(f"{directory}: no such sharded artifact directory")
    if not os.path.isfile(path):
        raise _io.CheckpointNotFoundError(f"{path}: missing; not a complete sharded artifact")
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
        ok = (isinstance(index, dict) and index.get("format") == FORMAT
              and index.get("crc32") == _index_crc(index))
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as e:
        raise ValueError(f"{path}: corrupted index ({type(e).__name__})") from None
    if not ok:
        raise ValueError(f"{path}: corrupted index (not a {FORMAT} index or checksum mismatch)")
    if index.get("version") != VERSION:
        raise ValueError(f"{path}: unknown {FORMAT} version {index.get('version')!r}")
    return index


def _open_files(directory: str, index: Mapping[str, Any], stack: contextlib.ExitStack
                ) -> dict[str, list[tuple]]:
    """``leaf -> [(file handle, path, key, box, dtype, crc)]`` over every shard file."""
    by_leaf: dict[str, list[tuple]] = {}
    for name in index["files"]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: shard file missing from the sharded artifact")
        try:
            handle = stack.enter_context(safetensors.safe_open(path, framework="numpy"))
            meta = handle.metadata() or {}
            info = json.loads(meta[_SHARD_FORMAT])
            keys = set(handle.keys())
            chunks = info["chunks"]
            if info.get("save_id") != index["save_id"]:
                raise ValueError("it belongs to another save (save id mismatch)")
            if set(chunks) != keys:
                raise ValueError("its chunk table does not name its tensors")
            for key, c in chunks.items():
                entry = (handle, path, key, [tuple(b) for b in c["index"]],
                         np.dtype(_dtype(c["dtype"])), int(c["crc32"]))
                by_leaf.setdefault(c["leaf"], []).append(entry)
        except (safetensors.SafetensorError, KeyError, TypeError, ValueError, OSError,
                RecursionError) as e:
            raise ValueError(f"{path}: corrupted shard file: {e}") from None
    return by_leaf


def _dtype(name: str) -> Any:
    return jax.numpy.dtype(name)


def _read_chunk(entry: tuple) -> np.ndarray:
    handle, path, key, box, dtype, crc = entry
    try:
        stored = handle.get_tensor(key)
    except (safetensors.SafetensorError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupted shard file, chunk {key!r}: {e}") from None
    if zlib.crc32(np.require(stored, requirements="C").reshape(-1).view(np.uint8)) != crc:
        raise ValueError(f"{path}: chunk {key!r} data corrupted (CRC32 mismatch)")
    shape = tuple(b - a for a, b in box)
    if stored.dtype != dtype:
        stored = stored.reshape(-1).view(np.uint8).view(dtype)
    return stored.reshape(shape)


def _assemble(where: str, leaf: str, box: list[list[int]], dtype: np.dtype,
              entries: list[tuple], cache: dict) -> np.ndarray:
    """The slice ``box`` of ``leaf``, cut from the stored chunks that overlap it."""
    out = np.empty(tuple(b - a for a, b in box), dtype)
    if out.size == 0:
        return out
    filled = 0
    for entry in entries:
        cbox = entry[3]
        lo = [max(a, c) for (a, _), (c, _) in zip(box, cbox)]
        hi = [min(b, d) for (_, b), (_, d) in zip(box, cbox)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        if entry[2] not in cache:
            cache[entry[2]] = _read_chunk(entry)
        chunk = cache[entry[2]]
        src = tuple(slice(low - c, h - c) for low, h, (c, _) in zip(lo, hi, cbox))
        dst = tuple(slice(low - a, h - a) for low, h, (a, _) in zip(lo, hi, box))
        out[dst] = chunk[src]
        filled += math.prod(h - low for low, h in zip(lo, hi))
    if filled != out.size:
        raise ValueError(f"{where}: the shard files hold {filled} of the {out.size} entries "
                         f"of slice {box} of leaf {leaf!r}")
    return out


def _saved_sharding(rec: Mapping[str, Any]) -> jax.sharding.Sharding | None:
    """The sharding the leaf was saved with, if its devices exist here."""
    saved = rec.get("sharding")
    if not saved:
        return None
    by_id = {d.id: d for d in jax.devices()}
    if not all(i in by_id for i in saved["devices"]):
        return None
    devices = np.array([by_id[i] for i in saved["devices"]]).reshape(saved["shape"])
    mesh = jax.sharding.Mesh(devices, tuple(saved["axes"]))
    spec = [tuple(e) if isinstance(e, list) else e for e in saved["spec"]]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _target(shardings: ShardingsArg, rec: Mapping[str, Any], shape: tuple, dtype: np.dtype
            ) -> jax.sharding.Sharding:
    if isinstance(shardings, jax.sharding.Sharding):
        chosen = shardings
    elif isinstance(shardings, Mapping):
        chosen = shardings.get(rec["name"])
    elif callable(shardings):
        chosen = shardings(rec["name"], shape, dtype)
    else:
        chosen = None
    if chosen is None:
        chosen = _saved_sharding(rec)
    if chosen is None:
        chosen = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if not isinstance(chosen, jax.sharding.Sharding):
        raise TypeError(f"{rec['name']}: shardings gave {chosen!r}, not a jax Sharding")
    return chosen


def load_sharded(directory: str | os.PathLike, *, shardings: ShardingsArg = None,
                 with_metadata: bool = False) -> Params | tuple[Params, Any]:
    """Loads a `save_sharded` artifact onto the same or a different mesh.

    Args:
      directory: the artifact directory.
      shardings: where each jax array goes: one ``jax.sharding.Sharding`` for all, a
        mapping from leaf name (``"dense.kernel.qvalue"``) to sharding, or a callable
        ``(name, shape, dtype) -> Sharding | None``. A leaf left out (or None) goes back
        to the sharding it was saved with when those devices exist, else to the first
        local device. Numpy leaves come back as numpy.
      with_metadata: also return the user metadata: ``(tree, metadata)``.

    Returns:
      The tree, or ``(tree, metadata)``.

    Raises:
      ValueError: naming the file, if the index or a shard file is missing, truncated or
        corrupted (CRC32 per chunk), or the files do not cover a leaf.
    """
    directory = os.fspath(directory)
    index = _read_index(directory)
    index_path = os.path.join(directory, INDEX)
    with contextlib.ExitStack() as stack:
        by_leaf = _open_files(directory, index, stack)

        def on_array(rec: dict[str, Any]) -> Any:
            shape, dtype = tuple(rec["shape"]), np.dtype(_dtype(rec["dtype"]))
            entries, cache = by_leaf.get(rec["name"], []), {}
            whole = [[0, n] for n in shape]
            if rec["kind"] != "jax":
                arr = _assemble(directory, rec["name"], whole, dtype, entries, cache)
                return arr[()] if rec["kind"] == "npscalar" else arr
            sharding = _target(shardings, rec, shape, dtype)
            return jax.make_array_from_callback(
                shape, sharding,
                lambda idx: _assemble(directory, rec["name"], _box(idx, shape), dtype, entries, cache))

        try:
            tree = _serial.decode_tree(index["tree"], {}, _io.BY_NAME, _io.node_build,
                                       on_array=on_array)
            metadata = _serial.from_json(index.get("metadata", {}))
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{index_path}: corrupted tree record: {e}") from None
    return (tree, metadata) if with_metadata else tree
