"""save / load: exact round trips, safetensors compatibility, atomic writes, bad files."""

import dataclasses
import json
import os
import pathlib

import _io_v1_tree
import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxopt_lab as jol
from jaxopt_lab import io


def _assert_same(a, b):
    """Same structure, leaf types, dtypes and bits (NaN-aware)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y), (type(x), type(y))
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and np.shape(x) == np.shape(y)
            bx = np.asarray(x).reshape(-1).view(np.uint8)
            np.testing.assert_array_equal(bx, np.asarray(y).reshape(-1).view(np.uint8))
        elif isinstance(x, float) and np.isnan(x):
            assert np.isnan(y)
        else:
            assert x == y


def _mixed_tree():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k[0], (16, 8))
    return {
        "q8": jol.quantize(w, bits=8),
        "q4g": jol.quantize(w, bits=4, granularity="group", group_size=4, symmetric=False),
        "q3": jol.quantize(w, bits=3, granularity="tensor"),
        "q2": jol.quantize(w, bits=2),
        "f8": jol.quantize(w, dtype="float8_e5m2"),
        "dtypes": [jnp.ones((2, 3), d) for d in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn,
                                                 jnp.int4, jnp.uint8, jnp.bool_)],
        "np": (np.arange(6, dtype=np.int64).reshape(2, 3), np.ones(2, np.complex64),
               np.float32(2.5)),
        "empty": jnp.zeros((0, 4)),
        "scalar": jnp.float32(-0.0),
        "py": [None, 1, 2.5, float("nan"), float("-inf"), "text", True],
        7: flax.core.FrozenDict({"b": jax.random.normal(k[1], (3,)), "a": jnp.arange(3)}),
    }


def test_roundtrip_is_exact_for_every_supported_leaf(tmp_path):
    tree = {str(k): v for k, v in _mixed_tree().items()}
    path = tmp_path / "m.safetensors"
    jol.save(path, tree, metadata={"step": 10, "shape": (1, 2), "name": "x", "lr": 1e-3})
    back, meta = jol.load(path, with_metadata=True)
    _assert_same(back, tree)
    assert meta == {"step": 10, "shape": (1, 2), "name": "x", "lr": 1e-3}
    assert jol.load_metadata(path) == meta
    chex.assert_trees_all_equal(jol.dequantize(back["q4g"]), jol.dequantize(tree["q4g"]))
    assert back["q4g"].qvalue.dtype == jnp.uint8 and back["q8"].qvalue.dtype == jnp.int8
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary files left


def test_int_dict_keys_and_bare_arrays(tmp_path):
    for tree in ({1: jnp.ones(2), 2: [jnp.zeros(1)]}, jnp.arange(5), None, [], {}):
        jol.save(tmp_path / "t.safetensors", tree)
        _assert_same(jol.load(tmp_path / "t.safetensors"), tree)


def test_file_is_standard_safetensors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    q = jol.quantize({"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}, bits=4)
    jol.save(path, q)
    with safe_open(path, framework="numpy") as f:
        assert set(f.keys()) == {"dense.bias", "dense.kernel.qvalue", "dense.kernel.scale"}
        qvalue = f.get_tensor("dense.kernel.qvalue")
        np.testing.assert_array_equal(qvalue, q["dense"]["kernel"].qvalue)
        assert f.metadata()["format"] == "jaxopt_lab"


def test_file_size_close_to_tree_nbytes(tmp_path):
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    p = {"Dense_0": {"kernel": jax.random.normal(k[0], (256, 512)), "bias": jnp.zeros(512)},
         "Dense_1": {"kernel": jax.random.normal(k[1], (512, 256)), "bias": jnp.zeros(256)}}
    for q in (jol.quantize(p, bits=4, granularity="group", group_size=128), jol.quantize(p)):
        jol.save(tmp_path / "m.safetensors", q)
        assert os.path.getsize(tmp_path / "m.safetensors") <= 1.05 * jol.tree_nbytes(q) + 65536


def test_failed_save_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    jol.save(path, {"w": jnp.ones(3)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"obj: cannot save a .*object"):
        jol.save(path, {"w": jnp.zeros(3), "obj": object()})

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        jol.save(path, {"w": jnp.zeros(3)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


def test_save_rejects_tracers_and_bad_metadata(tmp_path):
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda x: jol.save(tmp_path / "x.safetensors", {"x": x}) or x)(jnp.ones(2))
    with pytest.raises(TypeError, match="metadata"):
        jol.save(tmp_path / "x.safetensors", {}, metadata={"f": object()})


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "good.safetensors"
    jol.save(path, {"q": jol.quantize(jnp.ones((8, 8)), bits=4), "b": jnp.arange(4.0)})
    return path, path.read_bytes()


@settings(max_examples=60)
@given(st.data())
def test_truncated_or_corrupted_files_raise_value_error_naming_the_file(good_file, data):
    path, raw = good_file
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    bad = path.with_name("bad.safetensors")
    bad.write_bytes(raw)
    with pytest.raises(ValueError, match="bad.safetensors"):
        jol.load(bad)


def test_foreign_missing_and_non_safetensors_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not written by jaxopt_lab"):
        jol.load(foreign)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match="missing.safetensors"):
        jol.load(missing)
    with pytest.raises(FileNotFoundError):
        jol.load_metadata(missing)
    with pytest.raises(ValueError, match="is a directory|no such"):
        jol.load(tmp_path)
    for content in (b"", b"hello", os.urandom(64)):
        (tmp_path / "junk").write_bytes(content)
        with pytest.raises(ValueError, match="junk"):
            jol.load(tmp_path / "junk")


# --- extensibility: a sparse-storage node as the pruning engineer would register it ----


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Sparse:
    values: jax.Array
    bitmask: jax.Array
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))


class _Opaque:
    def __init__(self, data, note):
        self.data, self.note = data, note


jax.tree_util.register_pytree_node(_Opaque, lambda o: ((o.data,), o.note),
                                   lambda note, ch: _Opaque(ch[0], note))


def test_registered_nodes_roundtrip_and_count_in_tree_nbytes(tmp_path):
    io.register_node(_Sparse, "tests.Sparse")
    io.register_node(_Opaque, "tests.Opaque", flatten=lambda o: ({"data": o.data}, o.note),
                     unflatten=lambda note, ch: _Opaque(ch["data"], note))
    sp = _Sparse(jnp.arange(3.0), jnp.packbits(jnp.array([1, 0, 1, 1, 0, 0, 0, 0], bool)),
                 (8,), "float32")
    tree = {"sparse": sp, "opaque": _Opaque(jnp.ones(2), {"k": (1, "a")})}
    assert jol.tree_nbytes(tree) == 3 * 4 + 1 + 2 * 4
    jol.save(tmp_path / "s.safetensors", tree)
    back = jol.load(tmp_path / "s.safetensors")
    assert isinstance(back["sparse"], _Sparse) and back["sparse"].shape == (8,)
    assert back["opaque"].note == {"k": (1, "a")}
    _assert_same(back, tree)
    with pytest.raises(ValueError, match="already used"):
        io.register_node(dict, "tests.Sparse")


def test_unregistered_nodes_are_rejected(tmp_path):
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Unknown:
        x: jax.Array

    with pytest.raises(TypeError, match=r"layer: cannot save .*Unknown.*register_node"):
        jol.save(tmp_path / "u.safetensors", {"layer": Unknown(jnp.ones(2))})
    io.register_node(Unknown, "tests.Unknown")
    jol.save(tmp_path / "u.safetensors", {"layer": Unknown(jnp.ones(2))})
    del io.BY_NAME["tests.Unknown"], io.BY_TYPE[Unknown]
    with pytest.raises(ValueError, match="u.safetensors.*unknown node type 'tests.Unknown'"):
        jol.load(tmp_path / "u.safetensors")


def test_tree_nbytes_counts_packed_storage_tracers_and_shape_structs():
    w = {"k": jnp.zeros((64, 32)), "b": jnp.zeros(32), "n": 3}
    assert jol.tree_nbytes(w) == 64 * 32 * 4 + 32 * 4 + 8
    q = jol.quantize(w, bits=2, granularity="tensor")
    assert jol.tree_nbytes(q) == 64 * 8 + 4 + 32 * 4 + 8
    assert jol.tree_nbytes(jax.eval_shape(lambda: w["k"])) == 64 * 32 * 4
    assert jol.tree_nbytes(jnp.zeros(5, jnp.int4)) == 3
    jax.jit(lambda t: jnp.float32(jol.tree_nbytes(t)))(w)  # works on tracers


def test_nnx_state_with_quantized_params_roundtrips(tmp_path):
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    q = jol.quantize(nnx.state(model), bits=4)
    jol.save(tmp_path / "nnx.safetensors", q)
    back = jol.load(tmp_path / "nnx.safetensors")
    assert isinstance(back, nnx.State) and isinstance(back["kernel"], nnx.Param)
    _assert_same(back, q)
    nnx.update(model, jol.dequantize(back))
    chex.assert_trees_all_equal(model.kernel[...], jol.dequantize(q)["kernel"][...])


def test_save_into_missing_directory_names_it(tmp_path):
    """A ValueError (also FileNotFoundError, as open() raises) naming the missing directory;
    nothing is created (was a bare FileNotFoundError from mkstemp)."""
    missing = tmp_path / "missing"
    for err in (ValueError, FileNotFoundError):
        with pytest.raises(err, match="missing"):
            jol.save(missing / "x.safetensors", {"a": np.ones(2)})
    with pytest.raises(ValueError, match="directory"):
        jol.save(tmp_path, {"a": np.ones(2)})
    assert not missing.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_file_mode_honours_umask(tmp_path, umask):
    """Like open(path, "wb") of a new file: 0o666 less the umask (mkstemp gave 0o600)."""
    old = os.umask(umask)
    try:
        jol.save(tmp_path / "m.safetensors", {"a": np.ones(2)})
        jol.save(tmp_path / "m.safetensors", {"a": np.zeros(2)})  # replacing: same mode
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    np.testing.assert_array_equal(jol.load(tmp_path / "m.safetensors")["a"], np.zeros(2))


# --- format versions -----------------------------------------------------------------------


def test_files_of_format_version_1_still_load():
    """tests/data/io_v1.safetensors was written by the hand-made writer (format version 1)."""
    path = pathlib.Path(__file__).parent / "data" / "io_v1.safetensors"
    back, meta = jol.load(path, with_metadata=True)
    assert meta == _io_v1_tree.METADATA and jol.load_metadata(path) == meta
    _assert_same(back, _io_v1_tree.tree())
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()["jaxopt_lab"])["version"] == 1


def test_new_files_are_format_version_2_with_a_checksum_per_tensor(tmp_path):
    path = tmp_path / "v2.safetensors"
    jol.save(path, _io_v1_tree.tree(), metadata=_io_v1_tree.METADATA)
    with safe_open(str(path), framework="numpy") as f:
        info = json.loads(f.metadata()["jaxopt_lab"])
        assert info["version"] == 2 and set(info["crc32"]) == set(f.keys())
    _assert_same(jol.load(path), _io_v1_tree.tree())


def test_corrupted_tensor_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    jol.save(path, {"a": jnp.zeros(4), "b": jnp.ones(4)})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last tensor in the package's layout: "b" (names sort a < b)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"m.safetensors: tensor 'b' data corrupted"):
        jol.load(path)


def test_unknown_format_version_is_a_value_error(tmp_path):
    path = tmp_path / "m.safetensors"
    jol.save(path, {"a": jnp.zeros(2)})
    with safe_open(str(path), framework="numpy") as f:
        info = json.loads(f.metadata()["jaxopt_lab"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    for version in (0, 3):
        info["version"] = version
        info["header_crc32"] = io._header_crc(
            {"a": {"dtype": "F32", "shape": [2]}}, "jaxopt_lab", info)
        save_file(arrays, str(path), metadata={"format": "jaxopt_lab",
                                               "jaxopt_lab": json.dumps(info)})
        with pytest.raises(ValueError, match="m.safetensors.*version"):
            jol.load(path)
