"""Sparse storage: exact round trip, real byte savings, save/load, jit."""

import os

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.pruning.sparse import SparseTensor, is_sparse, sparse_array, to_dense, to_sparse

NASTY = st.sampled_from([0.0, 0.0, 0.0, -0.0, 1.0, np.nan, np.inf, -np.inf, 1e-45, -3e38])
_dense = jax.jit(to_dense)


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


SHAPES = [(), (0,), (3, 5), (2, 3, 4)]


@given(st.data(), st.sampled_from([np.float32, np.float16, np.int32, np.int8]),
       st.sampled_from(SHAPES))
def test_round_trip_bit_exact_any_dtype_and_shape(data, dtype, shape):
    x = data.draw(hnp.arrays(dtype, shape, elements=st.sampled_from([0, 0, 1, -1, 5])))
    sp = sparse_array(jnp.asarray(x))
    assert sp.shape == x.shape and sp.dtype == x.dtype
    np.testing.assert_array_equal(bits(_dense({"w": sp})["w"]), bits(x))


@given(hnp.arrays(np.float32, (37, 5), elements=NASTY | st.floats(width=32)))
def test_round_trip_nasty_floats_keeps_negative_zero_and_nan(x):
    np.testing.assert_array_equal(bits(_dense(sparse_array(x))), bits(x))


def test_ninety_percent_sparse_tree_is_much_smaller_in_bytes_and_on_disk(tmp_path):
    params = {"k": jax.random.normal(jax.random.PRNGKey(0), (64, 128)), "b": jnp.ones(128)}
    pruned = jol.apply_mask(params, jol.magnitude_mask(params, 0.9))
    sp = to_sparse(pruned)
    assert is_sparse(sp["k"]) and not is_sparse(sp["b"])
    dense_bytes, sparse_bytes = jol.tree_nbytes(pruned), jol.tree_nbytes(sp)
    assert sparse_bytes < 0.15 * dense_bytes
    path = os.path.join(tmp_path, "sparse.safetensors")
    jol.save(path, sp)
    assert os.path.getsize(path) < 0.15 * dense_bytes + 4096
    back = jol.load(path)
    assert isinstance(back["k"], SparseTensor)
    jax.tree.map(np.testing.assert_array_equal, to_dense(back), pruned)


def test_dense_leaves_stay_dense_unless_always():
    tree = {"k": jnp.ones((8, 8))}
    assert not is_sparse(to_sparse(tree)["k"])
    assert is_sparse(to_sparse(tree, always=True)["k"])
    assert is_sparse(to_sparse(tree, always=True, where=lambda p, x: True)["k"])


def test_sparse_tensor_is_a_pytree_under_jit_and_vmap():
    sp = sparse_array(jnp.asarray([[0.0, 2.0], [0.0, 0.0]]))
    doubled = jax.jit(lambda t: jax.tree.map(lambda a: a, t))(sp)
    assert isinstance(doubled, SparseTensor) and doubled.nbytes == 1 + 4
    np.testing.assert_array_equal(np.asarray(doubled.todense()), [[0.0, 2.0], [0.0, 0.0]])


def test_to_sparse_inside_jit_raises():
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda t: to_sparse(t, always=True))({"k": jnp.ones((2, 2))})
