"""Multi-process data-parallel training: 2 processes x 4 CPU devices == 1 process x 8 devices.

The end-to-end test runs ``tests/_mp_worker.py`` twice, for real, as a two-process JAX job
on 127.0.0.1 (gloo collectives) and compares its result with the same training run in
this process, whose 8 host devices come from conftest.py.
"""

import contextlib
import functools
import importlib.util
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab import app as A

from jaxopt_lab import train as T
from jaxopt_lab.train import distributed as dist
from jaxopt_lab.train.checkpoint import Checkpointer

WORKER_PATH = Path(__file__).with_name("_mp_worker.py")
_spec = importlib.util.spec_from_file_location("_mp_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

NUM_PROCESSES, LOCAL_DEVICES = 2, 4
# The workers compile like this process (conftest.py's codegen level): results compared
# across processes come from the same compiler settings.
_CODEGEN = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                    if "xla_backend_optimization_level" in f)
JOB_TIMEOUT_S = 120  # hard bound on the whole two-process job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    lines = [ln for ln in text.splitlines() if not ln.startswith("[Gloo]")]
    return "\n".join(lines)[-n:]


@contextlib.contextmanager
def running_job(work: Path):
    """Starts the workers as one JAX job; on leaving, waits for them within the time bound,
    kills whatever still runs (also when the body raised) and fails readably on any error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {_CODEGEN}")
    port, procs, logs, timed_out = _free_port(), [], [], False
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        for i in range(NUM_PROCESSES):
            logs.append(work / f"process_{i}.log")
            with open(logs[-1], "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER_PATH), str(i), str(NUM_PROCESSES), str(port),
                     str(LOCAL_DEVICES), str(work)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                ))
        yield
        # Wait for all; stop early once one fails (the others would block on it).
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # only our own children, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        report = "\n".join(f"--- process {i} (exit {c}) ---\n{_tail(log)}"
                           for i, (c, log) in enumerate(zip(codes, logs)))
        why = f"ran past {JOB_TIMEOUT_S}s and was killed" if timed_out else "failed"
        pytest.fail(f"multi-process job {why} (negative exit = killed by that signal):\n{report}")


@functools.lru_cache(maxsize=None)
def _train_split():
    return A.load_digits(seed=0, image=False).train


@functools.lru_cache(maxsize=None)
def reference():
    """``(initial state, final state on host)`` of the run on this process's 8-device mesh."""
    model, tx = worker.experiment()
    split = _train_split()
    init = T.create_train_state(model, tx, split.x, seed=0)
    step, put_state, put_batch = T.mesh_train_step(model, tx, T.data_mesh(8))
    state = put_state(init)
    for x, y in itertools.islice(T.batches(split, worker.GLOBAL_BATCH, seed=0), worker.STEPS):
        state, _ = step(state, *put_batch(x, y))
    return init, jax.device_get(state)


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    split = _train_split()
    np.savez(tmp_path / "data.npz", x=split.x, y=split.y)
    model, tx = worker.experiment()
    init = T.create_train_state(model, tx, split.x, seed=0)
    with Checkpointer(tmp_path / "init") as ckpt:
        ckpt.save(0, init)

    with running_job(tmp_path):
        ref = worker.flat(reference()[1])  # computed while the workers run
    got = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
    for i, g in enumerate(got):
        assert g.keys() == ref.keys(), i
        for key, want in ref.items():
            if key.startswith("masks") or key in ("step", "rng"):
                np.testing.assert_array_equal(g[key], want, err_msg=f"process {i}: {key}")
            else:  # the cross-process all-reduce may sum in another order: ulp-level only
                np.testing.assert_allclose(g[key], want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"process {i}: {key}")
        # Pruning really happened, with the scheduled 80% of each kernel at zero.
        for key in (k for k in g if k.startswith("params") and "kernel" in k):
            assert np.mean(g[key] == 0) == pytest.approx(0.8, abs=0.01), key
    for key in ref:  # both processes hold the very same replicated values
        np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)

    # The checkpoint both processes saved together restores here, on another topology,
    # into the right types, equal to what the processes held.
    with Checkpointer(tmp_path / "final") as ckpt:
        final, _ = ckpt.restore(init)
    assert type(final.opt_state[1]) is type(init.opt_state[1])
    for key, value in worker.flat(jax.device_get(final)).items():
        np.testing.assert_array_equal(value, got[0][key], err_msg=key)


def test_distributed_step_is_the_mesh_step_in_one_process():
    init, ref = reference()
    model, tx = worker.experiment()
    mesh = dist.global_mesh()
    step, put_state, put_batch = dist.distributed_train_step(model, tx, mesh)
    rows = dist.process_rows(mesh, worker.GLOBAL_BATCH)
    assert rows == slice(0, worker.GLOBAL_BATCH)
    state = put_state(init)
    for x, y in itertools.islice(T.batches(_train_split(), worker.GLOBAL_BATCH, seed=0),
                                 worker.STEPS):
        state, _ = step(state, *put_batch(x[rows], y[rows]))
    chex.assert_trees_all_equal(dist.to_host(state), ref)


@given(per_device=st.integers(1, 9), extra=st.integers(0, 7))
def test_process_rows_cover_the_batch_or_refuse(per_device, extra):
    mesh = dist.global_mesh()
    size = 8 * per_device + extra
    if extra:
        with pytest.raises(ValueError, match="not divisible"):
            dist.process_rows(mesh, size)
    else:
        assert dist.process_rows(mesh, size) == slice(0, size)


_leaves = st.sampled_from([
    np.float32(np.nan) * np.ones((2, 3), np.float32),
    np.array([np.inf, -np.inf, 0.0, -0.0], np.float64),
    np.zeros((0, 4), np.float32),
    np.array(7, np.int32),
    np.arange(6, dtype=np.uint8).reshape(3, 2),
    jnp.ones((2, 2), jnp.bfloat16),
    np.array([True, False]),
])


@given(st.dictionaries(st.sampled_from("abcd"), _leaves, max_size=4))
def test_put_replicated_keeps_values_including_nan(tree):
    placed = dist.put_replicated(dist.global_mesh(), tree)
    for key, value in placed.items():
        assert value.sharding.is_fully_replicated and len(value.sharding.device_set) == 8
        want = np.asarray(tree[key])  # as jax.device_put: 64-bit -> 32-bit unless x64
        want = want.astype(jax.dtypes.canonicalize_dtype(want.dtype))
        np.testing.assert_array_equal(np.asarray(value), want, strict=True)


def test_put_replicated_keeps_typed_prng_keys():
    key = jax.random.key(3)
    placed = dist.put_replicated(dist.global_mesh(), {"k": key})["k"]
    assert jax.random.key_impl(placed) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(placed), jax.random.key_data(key))


def test_put_process_batch_names_the_bad_leaf():
    mesh = dist.global_mesh()
    x, y = dist.put_process_batch(mesh, (np.ones((16, 3), np.float32), np.arange(16)))
    assert x.shape == (16, 3) and y.shape == (16,)
    assert x.sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match=r"\['y'\].*shape \(10,\)"):
        dist.put_process_batch(mesh, {"x": np.ones((16, 3)), "y": np.arange(10)})
    with pytest.raises(ValueError, match="shape \\(\\)"):
        dist.put_process_batch(mesh, np.float32(1.0))


@pytest.mark.parametrize("args, match", [
    (("localhost", 2, 0), "host:port"),
    (("127.0.0.1:port", 2, 0), "host:port"),
    (("127.0.0.1:1234", 0, 0), "num_processes"),
    (("127.0.0.1:1234", 2, 2), "process_id"),
    (("127.0.0.1:1234", 2, -1), "process_id"),
    ((None, None, -1), "process_id"),
])
def test_initialize_rejects_bad_settings_before_touching_jax(args, match):
    with pytest.raises(ValueError, match=match):
        dist.initialize(*args)
    with pytest.raises(ValueError, match="local_device_count"):
        dist.initialize("127.0.0.1:1234", 2, 0, local_device_count=0)
    with pytest.raises(ValueError, match="cpu_collectives"):
        dist.initialize("127.0.0.1:1234", 2, 0, cpu_collectives="nccl")
