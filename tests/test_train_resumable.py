"""Interrupted and resumed training equals uninterrupted training, bit for bit."""

import functools
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab import app as A

from jaxopt_lab import train as T
from jaxopt_lab.pruning import magnitude_mask, polynomial_schedule, prune
from jaxopt_lab.quant import lsq_fake_quant, lsq_init
from jaxopt_lab.train.checkpoint import Checkpointer, DataPosition
from jaxopt_lab.train.resumable import batches_from, train_resumable

STEPS, SAVE_EVERY, BATCH = 10, 3, 256  # 4 batches per epoch: the run crosses two epochs


def _net_kernels(path, leaf):
    return path[0].key == "net" and leaf.ndim >= 2


@functools.lru_cache(maxsize=None)
def setup():
    """Digits MLP with LSQ quantization-aware training (step sizes trained in the params)
    and gradual magnitude pruning in the optimizer chain."""
    model = A.MLP(hidden=(16,))
    tx = optax.chain(optax.adam(1e-2),
                     prune(magnitude_mask, polynomial_schedule(0.0, 0.6, 0, 8),
                           where=_net_kernels))
    data = A.load_digits(seed=0, image=False)

    @jax.jit
    def init():
        net = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
        return {"params": {"net": net, "lsq": lsq_init(net, bits=4)}}

    return model, tx, data, init()


def _param_transform(p):
    return lsq_fake_quant(p["net"], p["lsq"], bits=4)


def run(ckpt_dir, *, mesh=None, stop_after=None):
    model, tx, data, variables = setup()
    return train_resumable(model, data, tx, steps=STEPS, ckpt_dir=ckpt_dir,
                           save_every=SAVE_EVERY, batch_size=BATCH, variables=variables,
                           param_transform=_param_transform, mesh=mesh, stop_after=stop_after)


@functools.lru_cache(maxsize=None)
def uninterrupted(tmp_root: str, use_mesh: bool = False):
    mesh = T.data_mesh(8) if use_mesh else None
    return jax.device_get(run(os.path.join(tmp_root, f"full_{use_mesh}"), mesh=mesh))


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(jax.device_get(got))):
        assert np.asarray(g).dtype == np.asarray(w).dtype, jax.tree_util.keystr(path)
        assert np.array_equal(g, w, equal_nan=True), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resumable"))


@pytest.mark.parametrize("stops", [(5,), (3, 3, 3), (1, 7), (4, 4)],
                         ids=["mid_interval", "at_saves", "early", "twice_mid"])
def test_interrupted_runs_resume_bit_identically(tmp_root, tmp_path, stops):
    full = uninterrupted(tmp_root)
    for n in stops:
        partial = run(tmp_path, stop_after=n)
        assert int(partial.step) < STEPS
    resumed = run(tmp_path)
    assert int(resumed.step) == STEPS
    assert_bit_identical(resumed, full)
    # Masks pruned the kernels, and LSQ step sizes were trained and restored too.
    assert 0 < np.mean(np.asarray(full.opt_state[1].masks["net"]["Dense_0"]["kernel"])) < 1
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == STEPS
        _, position, _ = ckpt.restore_latest(full)
    assert position == DataPosition(STEPS // 4, STEPS % 4)


def test_resume_on_a_device_mesh_is_bit_identical(tmp_root, tmp_path):
    full = uninterrupted(tmp_root, use_mesh=True)
    run(tmp_path, mesh=T.data_mesh(8), stop_after=4)
    resumed = run(tmp_path, mesh=T.data_mesh(8))
    assert resumed.params["net"]["Dense_0"]["kernel"].sharding.is_fully_replicated
    assert_bit_identical(resumed, full)


def test_finished_run_is_returned_as_is(tmp_root, tmp_path):
    full = uninterrupted(tmp_root)
    run(tmp_path)
    again = run(tmp_path)  # nothing left to do: restores step STEPS
    assert_bit_identical(again, full)


# Trains in a fresh process and stalls in the middle of writing its second checkpoint
# (step 2 * SAVE_EVERY), where the test kills it with SIGKILL.
_KILLED_TRAINER = r"""
import importlib.util, sys, time
import orbax.checkpoint._src.handlers.json_checkpoint_handler as json_handler

spec = importlib.util.spec_from_file_location("resumable_test", sys.argv[1])
test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(test)
ckpt_dir, marker = sys.argv[2], sys.argv[3]
original, calls = json_handler.JsonCheckpointHandler._save_fn, []

async def stall_on_second_save(self, item, path):
    calls.append(path)
    if len(calls) == 2:
        open(marker, "w").write(str(path))
        time.sleep(600)
    return await original(self, item, path)

json_handler.JsonCheckpointHandler._save_fn = stall_on_second_save
test.run(ckpt_dir)
"""


def test_training_killed_mid_checkpoint_resumes_bit_identically(tmp_root, tmp_path):
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TRAINER, __file__, str(ckpt_dir), str(marker)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")[-3000:]
            pytest.fail(f"trainer never reached its second save (exit {proc.returncode}):\n{out}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.startswith(f"{2 * SAVE_EVERY}.") for p in os.listdir(ckpt_dir))
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [SAVE_EVERY]  # the half-written step is not listed
    resumed = run(ckpt_dir)  # a new process would do exactly this
    assert_bit_identical(resumed, uninterrupted(tmp_root))


@functools.lru_cache(maxsize=None)
def _split(n):
    return T.Split(np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int32))


@settings(max_examples=40)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 3),
       start=st.integers(0, 25), extra=st.integers(1, 12))
def test_batches_from_any_position_continue_the_same_stream(n, batch_size, seed, start, extra):
    split = _split(n)
    if batch_size > n:
        with pytest.raises(ValueError, match="does not fit"):
            batches_from(split, batch_size, seed=seed)
        return
    full = list(itertools.islice(batches_from(split, batch_size, seed=seed), start + extra))
    position = full[start - 1][0] if start else DataPosition()
    tail = list(itertools.islice(batches_from(split, batch_size, position, seed=seed), extra))
    for (p, x, y), (q, x2, y2) in zip(full[start:], tail, strict=True):
        assert p == q
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    per_epoch = n // batch_size
    positions = [p for p, _, _ in full]
    assert positions == [DataPosition((i + 1) // per_epoch, (i + 1) % per_epoch)
                         for i in range(len(full))]
    # Each epoch is the same examples as jol.train.batches, in the same order.
    ref = [y for _, y in T.batches(split, batch_size, seed=seed, epoch=0)]
    for i in range(min(per_epoch, len(full))):
        np.testing.assert_array_equal(full[i][2], ref[i])


def test_bad_arguments_raise(tmp_path):
    split = _split(10)
    with pytest.raises(ValueError, match="out of range"):
        batches_from(split, 3, DataPosition(0, 4))
    with pytest.raises(ValueError, match="out of range"):
        batches_from(split, 3, DataPosition(-1, 0))
    with pytest.raises(ValueError, match="does not fit"):
        batches_from(split, 0)
    model, tx, data, variables = setup()
    kwargs = dict(ckpt_dir=tmp_path, variables=variables, batch_size=BATCH,
                  param_transform=_param_transform)
    for bad in ({"steps": 0, "save_every": 1}, {"steps": 2, "save_every": -1},
                {"steps": 2, "save_every": 1, "stop_after": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            train_resumable(model, data, tx, **bad, **kwargs)
    train_resumable(model, data, tx, steps=2, save_every=1, **kwargs)
    with pytest.raises(ValueError, match="beyond steps=1"):
        train_resumable(model, data, tx, steps=1, save_every=1, **kwargs)
    assert Path(tmp_path, "2").is_dir()


@pytest.mark.parametrize("legacy_first", [True, False], ids=["legacy_then_new", "new_then_legacy"])
def test_resumable_is_bit_identical_to_the_loop_it_replaced(tmp_root, tmp_path, legacy_first):
    # train_resumable now runs on jol.train.train_loop; a run that the old loop started and
    # the new one finishes (or the other way round) equals the old loop's uninterrupted run,
    # checkpoints and all.
    from _legacy_loops import legacy_train_resumable  # here: a subprocess loads this file

    model, tx, data, variables = setup()
    kwargs = dict(steps=STEPS, save_every=SAVE_EVERY, batch_size=BATCH, variables=variables,
                  param_transform=_param_transform)
    want = legacy_train_resumable(model, data, tx, ckpt_dir=tmp_path / "legacy", **kwargs)
    assert_bit_identical(want, uninterrupted(tmp_root))
    first, second = ((legacy_train_resumable, train_resumable) if legacy_first
                     else (train_resumable, legacy_train_resumable))
    first(model, data, tx, ckpt_dir=tmp_path / "mixed", stop_after=5, **kwargs)
    got = second(model, data, tx, ckpt_dir=tmp_path / "mixed", **kwargs)
    assert_bit_identical(got, jax.device_get(want))
