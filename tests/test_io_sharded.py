"""io_sharded.save_sharded / io_sharded.load_sharded (jaxopt_lab/io_sharded.py) on 8 host devices: exact round
trips, shardings as saved or as requested (another mesh too), one copy of each shard, and a
ValueError naming the file for a missing, truncated or corrupted file."""

import json
import re
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import jaxopt_lab as jol
from jaxopt_lab import io as jol_io
from jaxopt_lab import io_sharded



def _shard(path) -> str:
    """The one shard file of a single-process artifact (named by its save's id)."""
    (name,) = [n for n in os.listdir(path) if n.startswith("shard-")]
    return name


def _mesh(shape=(8,), axes=("x",)):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), axes)


def _tree():
    mesh = _mesh()
    rng = np.random.default_rng(0)
    w = jax.device_put(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                       NamedSharding(mesh, P("x", None)))
    v = jax.device_put(jnp.asarray(rng.normal(size=(16, 64)), jnp.bfloat16),
                       NamedSharding(mesh, P(None, "x")))
    return {
        "w": w,
        "v": v,
        "rep": jax.device_put(jnp.arange(6.0), NamedSharding(mesh, P())),
        "q8": jol.quantize({"k": w}, bits=8)["k"],
        "q4": jol.quantize({"k": w}, bits=4, granularity="group", group_size=16)["k"],
        "mask": jol.magnitude_mask({"k": w}, 0.5)["k"],
        "f8": jnp.linspace(-1, 1, 8).astype(jnp.float8_e4m3fn),
        "host": np.arange(5, dtype=np.int16),
        "scalar": np.float32(1.5),
        "py": [1, 2.5, None, "s"],
    }


def _equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and np.shape(x) == np.shape(y)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        else:
            assert x == y


def _specs(tree):
    return [getattr(getattr(x, "sharding", None), "spec", None)
            for x in jax.tree.leaves(tree)]


@pytest.fixture
def saved(tmp_path):
    tree = _tree()
    io_sharded.save_sharded(tmp_path / "art", tree, metadata={"step": 4})
    return tmp_path / "art", tree


def test_round_trip_is_exact_and_keeps_the_saved_shardings(saved):
    path, tree = saved
    back, meta = io_sharded.load_sharded(path, with_metadata=True)
    assert meta == {"step": 4}
    _equal(back, tree)
    assert _specs(back) == _specs(tree)
    assert isinstance(back["q4"], jol.QTensor) and back["q4"].bits == 4
    np.testing.assert_array_equal(np.asarray(jol.dequantize(back["q4"])),
                                  np.asarray(jol.dequantize(tree["q4"])))


def test_each_shard_is_stored_once_as_plain_safetensors(saved):
    path, tree = saved
    SHARD = _shard(path)
    assert re.fullmatch(r"shard-[0-9a-f]{8}-00000-of-00001\.safetensors", SHARD)
    assert sorted(os.listdir(path)) == ["index.json", SHARD]
    with safe_open(str(path / SHARD), framework="numpy") as f:
        keys = list(f.keys())
        chunks = json.loads(f.metadata()["jaxopt_lab.shard"])["chunks"]
    assert len([k for k in keys if k.startswith("w@")]) == 8  # one per device
    assert len([k for k in keys if k.startswith("rep@")]) == 1  # replicated: one copy
    assert chunks["v@0:16,0:8"]["index"] == [[0, 16], [0, 8]]
    assert os.path.getsize(path / SHARD) <= 1.1 * jol.tree_nbytes(tree) + 65536


def test_loads_onto_another_mesh_and_as_requested(saved):
    path, tree = saved
    grid = _mesh((2, 4), ("a", "b"))

    def onto_grid(name, shape, dtype):
        del name, dtype
        return NamedSharding(grid, P("a", "b")) if len(shape) == 2 else None

    back = io_sharded.load_sharded(path, shardings=onto_grid)
    _equal(back, tree)
    assert back["w"].sharding.spec == P("a", "b") and back["q8"].qvalue.sharding.mesh == grid
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    back = io_sharded.load_sharded(path, shardings=one)
    _equal(back, tree)
    assert back["w"].sharding == one
    back = io_sharded.load_sharded(path, shardings={"w": NamedSharding(_mesh((4,)), P(None, "x"))})
    assert back["w"].sharding.spec == P(None, "x") and back["v"].sharding.spec == P(None, "x")
    _equal(back, tree)


@settings(max_examples=10)
@given(rows=st.sampled_from([8, 16, 24]), cols=st.sampled_from([4, 8, 32]),
       save_spec=st.sampled_from([P("x", None), P(None, "x"), P(), P("x", "y")]),
       load_spec=st.sampled_from([P("x", None), P(None, "y"), P(("x", "y")), P()]),
       dtype=st.sampled_from(["float32", "int8", "bfloat16", "bool", "int4"]))
def test_any_saved_layout_loads_onto_any_target(tmp_path_factory, rows, cols, save_spec,
                                               load_spec, dtype):
    path = tmp_path_factory.mktemp("art")
    x = np.arange(rows * cols).reshape(rows, cols) % 7
    x = jnp.asarray(x).astype(jnp.dtype(dtype))
    src = jax.device_put(x, NamedSharding(_mesh((4, 2), ("x", "y")), save_spec))
    io_sharded.save_sharded(path, {"x": src})
    target = NamedSharding(_mesh((2, 4), ("x", "y")), load_spec)
    back = io_sharded.load_sharded(path, shardings=target)["x"]
    assert back.sharding == target
    assert np.asarray(back).tobytes() == np.asarray(x).tobytes()


def test_missing_truncated_or_corrupted_files_are_value_errors_naming_them(saved):
    path, _ = saved
    SHARD = _shard(path)
    good = (path / SHARD).read_bytes()
    (path / SHARD).unlink()
    with pytest.raises(ValueError, match=f"{SHARD}: shard file missing"):
        io_sharded.load_sharded(path)
    (path / SHARD).write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{SHARD}: corrupted"):
        io_sharded.load_sharded(path)
    raw = bytearray(good)
    raw[-3] ^= 0x40
    (path / SHARD).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{SHARD}: chunk .* corrupted"):
        io_sharded.load_sharded(path)
    (path / SHARD).write_bytes(good)
    index = (path / "index.json").read_bytes()
    (path / "index.json").write_bytes(index.replace(b'"step": 4', b'"step": 5'))
    with pytest.raises(ValueError, match="index.json: corrupted index"):
        io_sharded.load_sharded(path)
    (path / "index.json").unlink()
    with pytest.raises(ValueError, match="index.json: missing"):
        io_sharded.load_sharded(path)
    with pytest.raises(ValueError, match="no such sharded artifact"):
        io_sharded.load_sharded(path / "nowhere")


@settings(max_examples=30)
@given(st.data())
def test_any_flipped_byte_or_cut_is_a_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("art")
    io_sharded.save_sharded(path, {"w": _tree()["w"], "q": _tree()["q4"]})
    name = data.draw(st.sampled_from([_shard(path), "index.json"]))
    raw = (path / name).read_bytes()  # its length varies with the random save id
    i = min(int(data.draw(st.floats(0, 1)) * len(raw)), len(raw) - 1)
    if data.draw(st.booleans()):
        raw = raw[:i]
    else:
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    (path / name).write_bytes(raw)
    try:
        back = io_sharded.load_sharded(path)
    except ValueError as e:
        assert name in str(e) or "index.json" in str(e)
        return
    # A change JSON ignores (e.g. whitespace in the header) may load: then it is exact.
    _equal(back, {"w": _tree()["w"], "q": _tree()["q4"]})


def test_files_of_another_save_are_rejected(tmp_path):
    path = tmp_path / "art"
    io_sharded.save_sharded(path, {"w": jnp.ones(8)})
    shutil.copy(path / _shard(path), tmp_path / "old")
    io_sharded.save_sharded(path, {"w": jnp.zeros(8)})
    SHARD = _shard(path)  # the old file is gone: only the new save's is listed
    shutil.copy(tmp_path / "old", path / SHARD)
    with pytest.raises(ValueError, match=f"{SHARD}: .*another save"):
        io_sharded.load_sharded(path)


def test_unsavable_leaves_are_type_errors_naming_them(tmp_path):
    with pytest.raises(TypeError, match="bad"):
        io_sharded.save_sharded(tmp_path / "art", {"bad": object()})
    with pytest.raises(TypeError, match="bad"):
        io_sharded.save_sharded(tmp_path / "art", {"bad": np.array([object()])})


def test_a_save_that_dies_before_its_index_leaves_the_previous_artifact(tmp_path, monkeypatch):
    path = tmp_path / "art"
    old = {"w": jnp.arange(8.0), "q": _tree()["q4"]}
    io_sharded.save_sharded(path, old, metadata={"step": 1})
    listed = sorted(os.listdir(path))
    real = jol_io.write_atomic

    def dies_at_the_index(name, raw):
        if os.path.basename(name) == io_sharded.INDEX:
            raise KeyboardInterrupt  # stands for the process dying here
        real(name, raw)

    monkeypatch.setattr(jol_io, "write_atomic", dies_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        io_sharded.save_sharded(path, {"w": jnp.zeros(8)}, metadata={"step": 2})
    monkeypatch.undo()
    assert len(os.listdir(path)) == len(listed) + 1  # the dead save's unlisted shard file
    back, meta = io_sharded.load_sharded(path, with_metadata=True)
    assert meta == {"step": 1}
    _equal(back, old)
    (tmp_path / "stale.tmp").touch()
    (path / ".index.json.0123abcd.tmp").touch()  # a temporary of a killed write
    io_sharded.save_sharded(path, {"w": jnp.ones(8)}, metadata={"step": 3})
    assert sorted(os.listdir(path)) == sorted(["index.json", _shard(path)])  # cleaned up
    assert io_sharded.load_sharded(path, with_metadata=True)[1] == {"step": 3}
