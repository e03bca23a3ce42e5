"""Save and load pytrees of arrays and `QTensor` s as safetensors files; `tree_nbytes`.

File format: a standard safetensors file, written and parsed by the ``safetensors``
package (``safetensors.numpy.save``, ``safetensors.deserialize``) and readable by
``safetensors.safe_open``. Every array leaf (and every array child of a `QTensor` or
registered node) is one tensor named by its tree path (``Dense_0.kernel.qvalue``). The
header's ``__metadata__["jaxopt_lab"]`` holds JSON (safetensors metadata values are
strings) with the tree structure, node metadata, user metadata, a CRC32 per tensor and a
CRC32 of the header itself. Dtypes safetensors has no code for (e.g. ``int4``, complex)
are stored as raw ``U8`` bytes.

Format version 2 (this one) checksums each tensor by name and the tensor table without
byte offsets, because the package chooses the order and offsets of the data (it sorts
tensors by alignment, then name). Version 1 files, written by jaxopt_lab's own writer
(one CRC32 over the data in file order, offsets in the header checksum), still load.
Files are written to a temporary name in the same directory, fsynced and ``os.replace``d,
so a crash never leaves a half-written file under the final name. The file gets the
permissions a plain ``open(path, "wb")`` of a new file would (``0o666`` less the umask).

Supported tree nodes: dict (str or int keys, insertion order kept), list, tuple, None,
Python bool/int/float/str leaves, numpy and jax arrays (returned as what they were),
`QTensor`, ``flax.core.FrozenDict``, ``nnx.State`` and flax's ``nnx.Variable`` kinds
(``nnx.Param``, ``nnx.BatchStat``...), and any class added with `register_node`.

Registering your own node (e.g. a sparse-storage node)::

    # 1. A jax pytree node whose aux data is JSON-able (str/int/float/bool/None, tuples,
    #    lists, str-keyed dicts, numpy dtypes): one line is enough; children are stored
    #    by jax's own flatten and the class rebuilt by its own unflatten.
    jaxopt_lab.io.register_node(SparseTensor, "mylib.SparseTensor")

    # 2. Otherwise give explicit functions; children are a dict of name -> subtree.
    jaxopt_lab.io.register_node(
        SparseTensor, "mylib.SparseTensor",
        flatten=lambda t: ({"mask": t.mask, "values": t.values}, {"shape": list(t.shape)}),
        unflatten=lambda aux, ch: SparseTensor(ch["mask"], ch["values"], tuple(aux["shape"])),
    )

``name`` is what goes into the file: keep it stable across versions. Register at import
time of the module defining the class, so that `load` finds it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import safetensors
import safetensors.numpy

from jaxopt_lab import _serial
from jaxopt_lab.quant.qtensor import FP8_DTYPES, GRANULARITIES, INT_BITS, QTensor

Params = Any
FORMAT = "jaxopt_lab"
VERSION = 2
_READS = (1, 2)  # format versions load() understands
_SUB_BYTE_BITS = {"int2": 2, "uint2": 2, "int4": 4, "uint4": 4, "float4_e2m1fn": 4}


class CheckpointNotFoundError(ValueError, FileNotFoundError):
    """`load` of a missing file: a ``ValueError`` that is also a ``FileNotFoundError``."""


class DirectoryNotFoundError(ValueError, FileNotFoundError):
    """`save` into a missing directory: a ``ValueError`` that is also a ``FileNotFoundError``
    (what ``open`` would raise), naming the directory; `save` creates no directories."""


def tree_nbytes(tree: Params) -> int:
    """The real bytes of every array leaf in ``tree``, through any pytree node.

    Packed `QTensor` storage counts as packed (its children are ``uint8``), and so does any
    custom node whose children are its real storage. Works on arrays, tracers and
    ``jax.ShapeDtypeStruct``; Python numbers count as their numpy size.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> w = {"k": jnp.zeros((256, 128)), "b": jnp.zeros(128)}
      >>> jol.tree_nbytes(w), jol.tree_nbytes(jol.quantize(w, bits=4))
      (131584, 17408)
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            dtype = np.dtype(leaf.dtype)
            n = math.prod(leaf.shape)
            bits = _SUB_BYTE_BITS.get(dtype.name)
            total += -(-n * bits // 8) if bits else n * dtype.itemsize
        elif isinstance(leaf, (bool, int, float, complex)):
            total += np.asarray(leaf).nbytes
    return total


# --- node registry -------------------------------------------------------------------

_Flatten = Callable[[Any], tuple[Mapping[str, Any], Any]]
_Unflatten = Callable[[Any, dict[str, Any]], Any]
BY_TYPE: dict[type, tuple[str, _Flatten | None, _Unflatten | None]] = {}
BY_NAME: dict[str, tuple[type, _Flatten | None, _Unflatten | None]] = {}


def register_node(
    cls: type, name: str, *, flatten: _Flatten | None = None, unflatten: _Unflatten | None = None
) -> None:
    """Makes `save` / `load` handle instances of ``cls`` (see the module docstring).

    Args:
      cls: the node class (exact type; subclasses need their own registration).
      name: stable identifier written into files.
      flatten: ``obj -> (children: Mapping[str, subtree], aux: JSON-able)``; default: jax's
        pytree flatten of ``cls`` (its aux data must then be JSON-able).
      unflatten: ``(aux, children: dict[str, subtree]) -> obj``; default: jax's unflatten.

    Raises:
      ValueError: if only one of ``flatten``/``unflatten`` is given, or ``name`` is taken
        by another class.
    """
    if (flatten is None) != (unflatten is None):
        raise ValueError(f"register_node({name!r}): give both flatten and unflatten, or neither")
    if name in BY_NAME and BY_NAME[name][0] is not cls:
        raise ValueError(f"register_node: name {name!r} already used by {BY_NAME[name][0]}")
    BY_TYPE[cls] = (name, flatten, unflatten)
    BY_NAME[name] = (cls, flatten, unflatten)


def _qtensor_flatten(t: QTensor) -> tuple[dict[str, Any], dict[str, Any]]:
    aux = {k: getattr(t, k) for k in ("bits", "granularity", "axis", "group_axis",
                                        "group_size", "fp8")}
    aux.update(shape=list(t.shape), dtype=t.dtype_name)
    return {"qvalue": t.qvalue, "scale": t.scale, "zero_point": t.zero_point}, aux


def _qtensor_unflatten(aux: dict[str, Any], ch: dict[str, Any]) -> QTensor:
    try:
        ok = (aux["bits"] in INT_BITS and aux["granularity"] in GRANULARITIES
              and aux["fp8"] in (None, *FP8_DTYPES))
        t = QTensor(ch["qvalue"], ch["scale"], ch["zero_point"], bits=aux["bits"],
                    shape=tuple(aux["shape"]), dtype=aux["dtype"],
                    granularity=aux["granularity"], axis=aux["axis"],
                    group_axis=aux["group_axis"], group_size=aux["group_size"], fp8=aux["fp8"])
        t._batch_shape()  # storage shape must match the metadata
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid QTensor record: {e}") from None
    if not ok:
        raise ValueError(f"invalid QTensor metadata {aux}")
    return t


register_node(QTensor, "jaxopt_lab.QTensor", flatten=_qtensor_flatten,
              unflatten=_qtensor_unflatten)


def _register_flax() -> None:
    """Flax containers: linen's FrozenDict, nnx.State and every nnx.Variable kind."""
    from flax import nnx
    from flax.core import FrozenDict

    register_node(FrozenDict, "flax.FrozenDict")
    register_node(nnx.State, "flax.nnx.State")
    todo = [nnx.Variable]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("flax."):
            register_node(cls, f"flax.nnx.{cls.__qualname__}")


try:
    _register_flax()
except ImportError:  # pragma: no cover - flax is a dependency, but keep io usable without
    pass


def node_parts(obj: Any, entry) -> tuple[list[str], list[Any], Any]:
    """(child names, children, aux) of a registered node."""
    _, flatten, _ = entry
    if flatten is not None:
        children, aux = flatten(obj)
        return list(children), list(children.values()), aux
    keyed, aux = jax.tree_util.flatten_one_level_with_keys(obj)
    names = [jax.tree_util.keystr((k,), simple=True, separator=".") for k, _ in keyed]
    return names, [c for _, c in keyed], aux


def node_build(name: str, aux: Any, names: list[str], children: list[Any]) -> Any:
    cls, _, unflatten = BY_NAME[name]
    if unflatten is not None:
        return unflatten(aux, dict(zip(names, children)))
    leaf = jax.tree.structure(0)
    treedef = jax.tree_util.PyTreeDef.from_node_data_and_children(
        jax.tree_util.default_registry, (cls, aux), [leaf] * len(children))
    return jax.tree.unflatten(treedef, children)


# --- save ------------------------------------------------------------------------------


def save(path: str | os.PathLike, tree: Params, *, metadata: Mapping[str, Any] | None = None
         ) -> None:
    """Writes ``tree`` to a safetensors file at ``path``, atomically.

    Args:
      path: destination file (conventionally ``*.safetensors``); its directory must exist
        (it is not created).
      tree: a pytree of arrays, `QTensor` s, Python scalars and ``None`` (see module doc).
      metadata: optional JSON-serialisable mapping, returned by `load_metadata`.

    Raises:
      TypeError: naming the path of a leaf or node that cannot be stored.
      ValueError: ``path``'s directory does not exist (`DirectoryNotFoundError`, also a
        ``FileNotFoundError``) or ``path`` is a directory.
      OSError: the write failed (disk full, file too large...): the error has the OS's
        errno and cause and names ``path``; no temporary file is left behind and a
        previous file at ``path`` is unchanged.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, jaxopt_lab as jol
      >>> d = tempfile.mkdtemp()
      >>> jol.save(os.path.join(d, "m.safetensors"), {"w": jnp.ones(3)}, metadata={"step": 7})
      >>> jol.load(os.path.join(d, "m.safetensors"), with_metadata=True)[1]
      {'step': 7}
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DirectoryNotFoundError(f"{path}: cannot save, directory {directory!r} does not "
                                     f"exist (create it first)")
    if os.path.isdir(path):
        raise ValueError(f"{path}: cannot save, it is a directory")
    tensors: list[tuple[str, np.ndarray]] = []
    spec = _serial.encode_tree(tree, tensors, BY_TYPE, node_parts)
    user = _serial.to_json(metadata or {}, "metadata")
    arrays, table = _serial.storage_arrays(tensors)
    crcs = {name: _serial.crc32(arr) for name, arr in arrays.items()}
    info = {"format": FORMAT, "version": VERSION, "tree": spec, "metadata": user, "crc32": crcs}
    info["header_crc32"] = _header_crc(table, FORMAT, info)
    header_meta = {"format": FORMAT, FORMAT: json.dumps(info, separators=(",", ":"))}
    try:
        # Serialised in memory, then written by the atomic, fsynced, error-naming path below
        # (``serialize_file`` would write the final name directly).
        raw = safetensors.numpy.save(arrays, metadata=header_meta)
    except (safetensors.SafetensorError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot save, safetensors refused the tensors: {e}") from None
    write_atomic(path, _sorted_header(raw))


def _sorted_header(raw: bytes) -> bytes:
    """``raw`` with its JSON header's keys sorted, padded to the same length.

    safetensors writes the metadata map in hash order, which changes from process to
    process; sorted, equal trees give byte-identical files in any process. Offsets are
    explicit in the header, so the key order carries no meaning.
    """
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    if len(text) > n:  # never: the same keys and values in another order
        return raw
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n:]


def write_atomic(path: str, raw: bytes) -> None:
    """Writes ``raw`` to a temporary file next to ``path``, fsyncs it, renames it into place.

    Raises:
      OSError: the write failed: the OS's errno and cause, naming ``path``; the temporary
        file is removed and a previous file at ``path`` is unchanged.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            # A full disk (ENOSPC), a file-size limit (EFBIG), a quota...: the raw error
            # names neither the file nor what happened to it.
            raise OSError(e.errno, f"{os.strerror(e.errno)}; cannot save (the temporary "
                          "file was removed and any previous file is unchanged)", path) from e
        raise


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new hidden temporary file next to the destination, opened for writing.

    Created with mode ``0o666`` so the OS applies the umask as for any new file
    (``tempfile.mkstemp`` would make it ``0o600``, which ``os.replace`` then keeps).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name for {name!r}")


# --- load ------------------------------------------------------------------------------


def _header_crc(table: Mapping[str, Any], fmt: Any, info: Mapping[str, Any]) -> int:
    """CRC32 of the canonical JSON of everything in the header but this checksum.

    A flipped byte can leave the JSON valid (a renamed key, a changed digit); this catches it.
    From format version 2 on, the table's byte offsets are left out: the safetensors
    package chooses them (and checks them when it parses the file).
    """
    if info.get("version", 0) >= 2:
        table = {name: {k: v for k, v in e.items() if k != "data_offsets"}
                 if isinstance(e, dict) else e for name, e in table.items()}
    rest = {k: v for k, v in info.items() if k != "header_crc32"}
    canon = json.dumps({"tensors": table, "format": fmt, "info": rest}, sort_keys=True,
                       separators=(",", ":"))
    return zlib.crc32(canon.encode())


def _read_header(f, path: str, size: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(tensor table, jaxopt_lab info, data start) of an open file, validated."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(head)} bytes)")
    n = int.from_bytes(head, "little")
    if n < 2 or 8 + n > size:
        raise ValueError(f"{path}: not a safetensors file or truncated (header length {n}, "
                         f"file size {size})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupted safetensors header ({e})") from None
    except RecursionError:  # a hostile header of deeply nested JSON
        raise ValueError(f"{path}: corrupted safetensors header (JSON nested too "
                         "deeply)") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or FORMAT not in meta:
        raise ValueError(f"{path}: a safetensors file not written by jaxopt_lab.save (no "
                         f"'{FORMAT}' entry in __metadata__); read it with safetensors instead")
    try:
        info = json.loads(meta[FORMAT])
        if info.get("format") != FORMAT or not isinstance(info.get("tree"), dict):
            raise ValueError("missing tree")
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: corrupted jaxopt_lab metadata ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: corrupted jaxopt_lab metadata (JSON nested too "
                         "deeply)") from None
    # Before the header checksum: another version may define that checksum differently.
    version = info.get("version")
    if isinstance(version, int) and version > VERSION:
        raise ValueError(f"{path}: written by a newer jaxopt_lab (format version "
                         f"{info['version']} > {VERSION})")
    if info.get("version") not in _READS:
        raise ValueError(f"{path}: unknown jaxopt_lab format version {info.get('version')!r}")
    try:
        crc = _header_crc(header, meta.get("format"), info)
    except RecursionError:  # nesting that json.loads took but json.dumps can't
        raise ValueError(f"{path}: corrupted safetensors header (JSON nested too "
                         "deeply)") from None
    if info.get("header_crc32") != crc:
        raise ValueError(f"{path}: corrupted safetensors header (checksum mismatch)")
    return header, info, 8 + n


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The user ``metadata`` mapping saved with the tree (reads only the header)."""
    path = _existing(path)
    with open(path, "rb") as f:
        _, info, _ = _read_header(f, path, os.fstat(f.fileno()).st_size)
    try:
        return _serial.from_json(info.get("metadata", {}))
    except RecursionError:
        raise ValueError(f"{path}: corrupted jaxopt_lab metadata (nested too deeply)") from None


def _existing(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
    return path


def load(path: str | os.PathLike, *, with_metadata: bool = False) -> Params | tuple[Params, Any]:
    """Reads a tree written by `save`, exactly as it was saved.

    Args:
      path: the file.
      with_metadata: also return the user metadata: ``(tree, metadata)``.

    Returns:
      The tree (jax arrays come back as jax arrays, numpy as numpy, `QTensor` with its
      integer storage), or ``(tree, metadata)``.

    Raises:
      ValueError: naming the file, if it is missing (`CheckpointNotFoundError`), truncated,
        corrupted (header, tensor table or CRC32 of the data), or not a jaxopt_lab file.
    """
    path = _existing(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, info, start = _read_header(f, path, size)
        f.seek(0)
        raw = f.read()
    try:
        entries = safetensors.deserialize(raw)
    except (safetensors.SafetensorError, ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path}: corrupted or truncated safetensors file: {e}") from None
    table = {}
    for name, e in entries:
        if e["dtype"] not in _serial.ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
        table[name] = (e["dtype"], tuple(e["shape"]), e["data"])
    if info["version"] == 1:  # one CRC32 over the data, in file order
        ok = zlib.crc32(memoryview(raw)[start:]) == info.get("crc32")
        if not ok:
            raise ValueError(f"{path}: tensor data corrupted (CRC32 mismatch)")
    else:
        crcs = info.get("crc32")
        if not isinstance(crcs, dict) or set(crcs) != set(table):
            raise ValueError(f"{path}: corrupted jaxopt_lab metadata (the checksums do not "
                             "name the file's tensors)")
        for name, (_, _, buf) in table.items():
            if zlib.crc32(buf) != crcs[name]:
                raise ValueError(f"{path}: tensor {name!r} data corrupted (CRC32 mismatch)")
    try:
        tree = _serial.decode_tree(info["tree"], table, BY_NAME, node_build)
        metadata = _serial.from_json(info.get("metadata", {})) if with_metadata else None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: corrupted jaxopt_lab tree record: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: corrupted jaxopt_lab tree record (nested too "
                         "deeply)") from None
    if with_metadata:
        return tree, metadata
    return tree
