"""Hadamard rotation: orthogonal, and a pre-RMSNorm residual model's float output is
unchanged within 1e-5 after folding the norm scales and rotating the stream."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.oneshot import fold_norm_scale, random_hadamard, rotate_readers, rotate_writers

D, V = 12, 20


class PreNorm(nn.Module):
    """Embedding -> 2 x (h += W2 relu(W1 rmsnorm(h))) -> rmsnorm -> head."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        for i in range(2):
            y = nn.RMSNorm(name=f"norm{i}")(h)
            h = h + nn.Dense(D, use_bias=False, name=f"down{i}")(
                jax.nn.relu(nn.Dense(2 * D, name=f"up{i}")(y)))
        return nn.Dense(7, name="head")(nn.RMSNorm(name="norm_f")(h))


@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 12, 16, 384]))
def test_orthogonal(seed, n):
    q = np.asarray(random_hadamard(jax.random.key(seed), n), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=2e-5)


@given(st.integers(0, 2**31 - 1))
def test_rotation_keeps_a_pre_rmsnorm_model(seed):
    model = PreNorm()
    ids = jnp.arange(10)[None] % V
    p = model.init(jax.random.key(seed % 997), ids)["params"]
    rng = np.random.default_rng(seed)
    p = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype), p)
    q = random_hadamard(jax.random.key(seed), D)
    r = jax.tree.map(lambda a: a, p)
    r["embed"]["embedding"], = rotate_writers([p["embed"]["embedding"]], q)
    for i in range(2):
        r[f"norm{i}"]["scale"], (up,) = fold_norm_scale(p[f"norm{i}"]["scale"],
                                                        [p[f"up{i}"]["kernel"]])
        r[f"up{i}"]["kernel"], = rotate_readers([up], q)
        r[f"down{i}"]["kernel"], = rotate_writers([p[f"down{i}"]["kernel"]], q)
    r["norm_f"]["scale"], (head,) = fold_norm_scale(p["norm_f"]["scale"], [p["head"]["kernel"]])
    r["head"]["kernel"], = rotate_readers([head], q)
    np.testing.assert_allclose(model.apply({"params": r}, ids), model.apply({"params": p}, ids),
                               atol=1e-5, rtol=1e-5)


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.rotation")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
