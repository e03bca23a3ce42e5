"""L1 and L2 regularisers are optax transformations adding the right (sub)gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxopt_lab import train as T

# XLA on CPU flushes subnormals to zero, so sign() of a subnormal is 0 there.
floats = hnp.arrays(
    np.float32, (3, 4), elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
)


@given(w=floats, b=hnp.arrays(np.float32, (4,), elements=st.floats(-10, 10, width=32)),
       strength=st.floats(0, 10))
def test_l1_adds_strength_times_sign_on_selected_leaves(w, b, strength):
    params = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = T.add_l1(strength)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["kernel"], 1 + np.float32(strength) * np.sign(w), rtol=1e-6)
    np.testing.assert_array_equal(upd["bias"], np.ones(4, np.float32))  # bias not selected


def test_l1_matches_autodiff_of_the_penalty_away_from_zero():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)), jnp.float32)
    tx = T.add_l1(0.3, where=lambda path, leaf: True)
    upd, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    want = jax.grad(lambda p: 0.3 * jnp.abs(p).sum())(w)
    chex.assert_trees_all_close(upd["w"], want)


def test_l2_is_gradient_of_half_squared_norm_and_chains_with_optax():
    w = {"k": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = T.add_l2(0.1)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, w), tx.init(w), w)
    chex.assert_trees_all_close(upd["k"], 0.1 * w["k"])
    chex.assert_trees_all_close(upd["b"], jnp.zeros(3))
    # In a chain with sgd the penalty shrinks the selected weights only.
    chain = optax.chain(T.add_l1(0.01), T.add_l2(0.1), optax.sgd(1.0))
    state = chain.init(w)
    upd, _ = chain.update(jax.tree.map(jnp.zeros_like, w), state, w)
    new = optax.apply_updates(w, upd)
    assert float(jnp.abs(new["k"]).sum()) < float(jnp.abs(w["k"]).sum())
    chex.assert_trees_all_close(new["b"], w["b"])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x"])
def test_bad_strength(bad):
    for fn in (T.add_l1, T.add_l2):
        with pytest.raises(ValueError, match="strength"):
            fn(bad)


def test_l1_needs_params():
    tx = T.add_l1(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones((2, 2))}, tx.init({"w": jnp.ones((2, 2))}))
