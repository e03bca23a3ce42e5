"""Training helpers of the main job: device checks, batch sizes, one-shot programs, and
the mesh path agreeing with ``jol.train.fit``."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab import train
from jaxopt_lab.app.report.models import DenseBNNet
from jaxopt_lab.app.report.training import (
    check_devices,
    fit_model,
    global_batch,
    init_variables,
    run_once,
)


def test_check_devices():
    check_devices(None)
    check_devices(jax.device_count())
    with pytest.raises(ValueError, match="only"):
        check_devices(jax.device_count() + 1)
    with pytest.raises(ValueError, match=">= 1"):
        check_devices(0)


@given(batch=st.integers(1, 300), n=st.integers(1, 300), devices=st.sampled_from([None, 1, 2, 3, 8]))
def test_global_batch_divides_and_fits(batch, n, devices):
    d = devices or 1
    if d * -(-min(batch, n) // d) > n:
        with pytest.raises(ValueError):
            global_batch(batch, n, devices)
        return
    b = global_batch(batch, n, devices)
    assert b % d == 0 and 1 <= b <= n and b >= min(batch, n)


def test_run_once_matches_jit_and_init_matches_create_train_state():
    f = lambda x, y: {"s": jnp.sin(x) * y, "c": jnp.cumsum(x)}  # noqa: E731
    x, y = jnp.linspace(-3, 3, 17), jnp.float32(2.0)
    chex.assert_trees_all_close(run_once(f, x, y), jax.jit(f)(x, y), atol=1e-6)
    model = DenseBNNet(hidden=(8,), num_classes=3)
    xs = np.ones((4, 5), np.float32)
    state = train.create_train_state(model, optax.sgd(0.1), xs, seed=3)
    v = init_variables(model, xs, 3)
    chex.assert_trees_all_close(v["params"], state.params, atol=1e-6)


@functools.cache
def _tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    return train.make_dataset(x, y, seed=0, fractions=(0.5, 0.25, 0.25))


def test_mesh_path_agrees_with_single_device():
    data, model = _tiny_data(), DenseBNNet(hidden=(8,), num_classes=2)
    kwargs = dict(epochs=2, batch_size=16, seed=0)  # best on validation, as fit does
    single = fit_model(model, data, optax.adam(1e-2), **kwargs)
    mesh = fit_model(model, data, optax.adam(1e-2), devices=2, **kwargs)
    chex.assert_trees_all_close(single, mesh, atol=1e-4)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(mesh))


def test_keep_last_returns_the_final_state_and_best_otherwise():
    data, model = _tiny_data(), DenseBNNet(hidden=(8,), num_classes=2)
    last = fit_model(model, data, optax.adam(1e-2), epochs=3, batch_size=16, seed=0,
                     keep_last=True)
    ref, hist = train.fit(model, data, optax.adam(1e-2), epochs=3, batch_size=16, seed=0,
                          variables=init_variables(model, data.train.x, 0))
    chex.assert_trees_all_close(last["params"], hist["final_state"].params, atol=1e-6)
    best = fit_model(model, data, optax.adam(1e-2), epochs=3, batch_size=16, seed=0)
    chex.assert_trees_all_close(best["params"], ref["params"], atol=1e-6)
