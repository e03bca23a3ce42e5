"""Wanda: uniform activations give magnitude pruning (per output and layer scope), exact
counts, N:M, mask trees, errors naming the layer."""

import doctest
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, wanda, wanda_matrix

K, N = 8, 5
_w = hnp.arrays(np.float32, (K, N), elements=st.one_of(
    st.floats(-10, 10, width=32), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30])))
_c = st.sampled_from([1.0, 0.25, 4.0])  # exact scalings: no ties made by rounding


@given(_w, _c, st.floats(0.0, 1.0))
def test_uniform_activations_equal_magnitude_pruning(w, c, s):
    norm = jnp.full((K,), c)
    # Per output (the paper): each column on its own, as magnitude_mask on that column.
    per_out = wanda_matrix(w, norm, sparsity=s)
    cols = {str(j): jnp.asarray(w[:, j]) for j in range(N)}
    mag = jol.magnitude_mask(cols, s, where=lambda p, x: True)
    np.testing.assert_array_equal(per_out, np.stack([mag[str(j)] for j in range(N)], 1))
    layer = wanda_matrix(w, norm, sparsity=s, scope="layer")
    np.testing.assert_array_equal(layer, jol.magnitude_mask(jnp.asarray(w), s))
    nm = wanda_matrix(w, norm, n=2, m=4)
    np.testing.assert_array_equal(nm, jol.nm_mask(jnp.asarray(w), n=2, m=4, axis=0))


@given(_w, hnp.arrays(np.float32, (K,), elements=st.floats(0, 100, width=32)),
       st.floats(0.0, 1.0))
def test_exact_counts(w, norm, s):
    assert int((~wanda_matrix(w, norm, sparsity=s)).sum()) == N * int(np.floor(s * K))
    layer = wanda_matrix(w, norm, sparsity=s, scope="layer")
    assert int((~layer).sum()) == int(np.floor(s * K * N))
    assert (np.asarray(wanda_matrix(w, norm, n=1, m=4)).reshape(2, 4, N).sum(1) == 1).all()


def test_activation_norm_changes_the_choice():
    w = jnp.array([[1.0], [2.0]])
    assert wanda_matrix(w, jnp.array([3.0, 1.0]), sparsity=0.5)[:, 0].tolist() == [True, False]


def test_tree_level_and_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, K)).astype(np.float32)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(K, N)), jnp.float32),
                    "bias": jnp.zeros(N)}}
    stats = {"a": hessian_accumulate(hessian_init(K), x)}
    masks = wanda(params, stats, sparsity=0.5)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(0))
    np.testing.assert_array_equal(masks["a"]["kernel"],
                                  wanda_matrix(params["a"]["kernel"], norm, sparsity=0.5))
    assert masks["a"]["bias"].all()
    name = r"\['a'\]\['kernel'\]"
    with pytest.raises(ValueError, match=name + ".*sparsity must be in"):
        wanda(params, stats, sparsity=1.01)
    with pytest.raises(ValueError, match=name + ".*no calibration data"):
        wanda(params, {"a": hessian_init(K)}, sparsity=0.5)
    with pytest.raises(ValueError, match=name + ".*scope"):
        wanda(params, stats, sparsity=0.5, scope="global")
    with pytest.raises(ValueError, match="L.*NaN"):
        wanda_matrix(params["a"]["kernel"], jnp.full((K,), jnp.nan), sparsity=0.5, name="L")


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.wanda")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
