"""Checkpointer: exact round trips into the right types, clear errors, atomic saves."""

import functools
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab import app as A

from jaxopt_lab import train as T
from jaxopt_lab.pruning import PruneState, magnitude_mask, polynomial_schedule, prune
from jaxopt_lab.quant import lsq_fake_quant, lsq_init
from jaxopt_lab.train.checkpoint import Checkpointer, DataPosition


def _net_kernels(path, leaf):
    return path[0].key == "net" and leaf.ndim >= 2


def qat_prune_setup():
    """An MLP trained with LSQ fake quantization (trainable step sizes in the params)
    and gradual magnitude pruning of its kernels: every kind of state a run carries."""
    model = A.MLP(hidden=(16,))
    tx = optax.chain(optax.adam(1e-2),
                     prune(magnitude_mask, polynomial_schedule(0.0, 0.5, 0, 4),
                           where=_net_kernels))

    @functools.partial(jax.jit, static_argnums=0)  # one compile beats eager flax init
    def variables(seed=0):
        x = jnp.zeros((1, 64), jnp.float32)
        net = model.init(jax.random.PRNGKey(seed), x)["params"]
        return {"params": {"net": net, "lsq": lsq_init(net, bits=4)}}

    def param_transform(p):
        return lsq_fake_quant(p["net"], p["lsq"], bits=4)

    return model, tx, variables, param_transform


@functools.lru_cache(maxsize=None)
def trained_state():
    """``(state after 3 steps, an abstract state of the same structure as restore target)``."""
    model, tx, variables, transform = qat_prune_setup()
    data = A.load_digits(image=False)
    state = T.create_train_state(model, tx, data.train.x, variables=variables(0))
    step = jax.jit(T.make_train_step(model, tx, param_transform=transform))
    for x, y in itertools.islice(T.batches(data.train, 64), 3):
        state, _ = step(state, x, y)
    fresh = jax.eval_shape(
        lambda: T.create_train_state(model, tx, data.train.x, variables=variables(1))
    )
    assert isinstance(jax.tree.leaves(fresh)[0], jax.ShapeDtypeStruct)
    return state, fresh


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
        assert np.array_equal(g, w, equal_nan=True), jax.tree_util.keystr(path)


def test_train_state_round_trip_keeps_types_masks_and_qat_steps(tmp_path):
    state, fresh = trained_state()
    masks = state.opt_state[1].masks
    assert 0 < np.mean(np.asarray(masks["net"]["Dense_0"]["kernel"])) < 1  # pruning began
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, DataPosition(epoch=0, batch=3), metadata={"note": "qat"})
        restored, position = ckpt.restore(fresh)
        assert ckpt.metadata(3) == {"note": "qat"}
    assert position == DataPosition(0, 3) and type(position) is DataPosition
    assert_bit_identical(restored, state)
    assert type(restored) is T.TrainState
    assert type(restored.opt_state[1]) is PruneState
    assert type(restored.opt_state[0][0]) is type(state.opt_state[0][0])  # ScaleByAdamState
    assert restored.params["lsq"]["Dense_0"]["bias"] is None  # None leaves stay None


_dtypes = st.sampled_from([np.float32, np.float16, jnp.bfloat16, np.int8, np.uint8,
                           np.int32, np.bool_])
_shapes = st.sampled_from([(), (0,), (3,), (2, 0, 3), (4, 5)])
_fill = st.sampled_from(["random", "zeros", "nan_inf", "huge"])


def _leaf(dtype, shape, fill, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    if fill == "zeros":
        x = np.zeros(shape)
    elif fill == "nan_inf" and x.size:
        x.flat[::2] = np.nan
        x.flat[1::3] = -np.inf
    elif fill == "huge":
        x = x * 1e30
    if not np.issubdtype(np.dtype(dtype), np.floating):
        x = np.nan_to_num(x, nan=0, posinf=0, neginf=0).clip(-100, 100)
    with np.errstate(over="ignore", invalid="ignore"):
        return jnp.asarray(x.astype(dtype))


@settings(max_examples=12)
@given(st.lists(st.tuples(_dtypes, _shapes, _fill), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_any_tree_of_arrays_round_trips_bit_exactly(specs, step):
    tree = {f"leaf{i}": _leaf(*spec, seed=i) for i, spec in enumerate(specs)}
    tree["nested"] = (tree["leaf0"], {"again": tree["leaf0"]})
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
        ckpt.save(step, tree)
        restored, _ = ckpt.restore(target, step=step)
    assert_bit_identical(restored, tree)
    assert type(restored["nested"]) is tuple


def test_typed_prng_keys_round_trip(tmp_path):
    tree = {"key": jax.random.key(7), "raw": jax.random.PRNGKey(7)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, tree)
        restored, _ = ckpt.restore(tree)
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(tree["key"]))
    np.testing.assert_array_equal(restored["raw"], tree["raw"])


def test_steps_latest_and_max_to_keep(tmp_path):
    tree = {"w": jnp.arange(3.0)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.restore_latest(tree) is None
        for s in (1, 2, 5):
            ckpt.save(s, jax.tree.map(lambda a: a * s, tree), DataPosition(s, 0))  # noqa: B023
        assert ckpt.all_steps() == [2, 5] and ckpt.latest_step() == 5
        state, position, step = ckpt.restore_latest(tree)
        assert step == 5 and position == DataPosition(5, 0)
        np.testing.assert_array_equal(state["w"], [0.0, 5.0, 10.0])
        older, _ = ckpt.restore(tree, step=2)
        np.testing.assert_array_equal(older["w"], [0.0, 2.0, 4.0])


def test_async_save_is_complete_after_wait(tmp_path):
    state, fresh = trained_state()
    with Checkpointer(tmp_path, asynchronous=True) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1]
        restored, _ = ckpt.restore(fresh)
    assert_bit_identical(restored, state)


def test_bad_requests_raise_clear_errors(tmp_path):
    tree = {"a": jnp.ones((2, 3)), "b": {"c": jnp.zeros(4, jnp.int32)}}
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(tree)
        ckpt.save(1, tree)
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(1, tree)
        with pytest.raises(ValueError, match="must be >= 0"):
            ckpt.save(-1, tree)
        with pytest.raises(ValueError, match="non-negative"):
            ckpt.save(2, tree, DataPosition(0, -1))
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(2, tree, metadata={"bad": object()})
        assert ckpt.all_steps() == [1]
        with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 .*\[1\]"):
            ckpt.restore(tree, step=7)
        where = os.path.join(str(tmp_path), "1")
        with pytest.raises(ValueError, match=rf"{where}.*missing.*b\.d.*not in the target.*b\.c"):
            ckpt.restore({"a": tree["a"], "b": {"d": tree["b"]["c"]}})
        with pytest.raises(ValueError, match=r"'a' is float32\(2, 3\) on disk but float32\(3, 2\)"):
            ckpt.restore({"a": jnp.ones((3, 2)), "b": tree["b"]})
        with pytest.raises(ValueError, match=r"'b\.c' is int32\(4,\) on disk but float32\(4,\)"):
            ckpt.restore({"a": tree["a"], "b": {"c": jnp.zeros(4)}})
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "other", max_to_keep=0)


# Saves checkpoint 1, then stalls in the middle of writing checkpoint 2 (the array data is
# being written, the small JSON item is not), announces it, and waits to be killed.
_KILLED_WRITER = r"""
import os, sys, time
import numpy as np
import orbax.checkpoint._src.handlers.json_checkpoint_handler as json_handler
from jaxopt_lab.train.checkpoint import Checkpointer, DataPosition

directory, marker = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
ckpt = Checkpointer(directory)
ckpt.save(1, {"w": rng.standard_normal((64, 64)).astype(np.float32)}, DataPosition(0, 1))

async def stall(self, item, path):
    with open(marker, "w") as f:
        f.write(str(path))
    time.sleep(600)

json_handler.JsonCheckpointHandler._save_fn = stall
ckpt.save(2, {"w": rng.standard_normal((1024, 1024)).astype(np.float32)}, DataPosition(0, 2))
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(directory), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")[-3000:]
            pytest.fail(f"writer never reached the second save (exit {proc.returncode}):\n{out}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(directory) if p.startswith("2.")]
    assert leftovers, os.listdir(directory)  # the half-written step 2 is on disk...
    half = directory / leftovers[0]
    assert any(files for _, _, files in os.walk(half)), "step 2 had not started writing"

    expected = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    with Checkpointer(directory) as ckpt:  # ...but ignored, then cleaned up
        assert ckpt.all_steps() == [1]
        state, position = ckpt.restore({"w": jnp.zeros((64, 64))})
        np.testing.assert_array_equal(state["w"], expected)
        assert position == DataPosition(0, 1)
        assert not half.exists()
        ckpt.save(2, {"w": jnp.ones((64, 64))})  # and saving goes on
        assert ckpt.all_steps() == [1, 2]
