"""Shared helpers for the tests/test_fold_*.py modules (not a test module itself)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _filler(seed: int, zero_scale: bool):
    rng = np.random.default_rng(seed)

    def fill(name: str, s):
        if name == "kernel":
            fan_in = math.prod(s.shape[:-1]) or 1
            value = rng.normal(size=s.shape) / math.sqrt(fan_in)
        elif name == "var":
            value = rng.uniform(0.2, 3.0, s.shape)
        elif name == "scale":
            value = rng.normal(1.0, 0.5, s.shape)
            if zero_scale and value.size:
                value.reshape(-1)[0] = 0.0
        else:  # biases, BatchNorm means and biases
            value = rng.normal(0.0, 0.5, s.shape)
        return jnp.asarray(value, s.dtype)

    return fill


def random_variables(model: nn.Module, *args, seed: int = 0, zero_scale: bool = True, **kwargs):
    """Random but valid variables for ``model`` without running its (slow, eager) init.

    Kernels are fan-in scaled, running variances lie in [0.2, 3], BatchNorm scales are
    random with (if ``zero_scale``) one channel of each BatchNorm exactly 0.
    """
    init = functools.partial(model.init, **kwargs)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
    fill = _filler(seed, zero_scale)
    return jax.tree_util.tree_map_with_path(lambda p, s: fill(p[-1].key, s), shapes)


def random_nnx(factory, *, seed: int = 0, zero_scale: bool = True) -> nnx.Module:
    """``factory()``'s NNX module with random valid values, built without eager init."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    fill = _filler(seed, zero_scale)

    def fill_at(path, s):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return fill(names[-2] if names[-1] == "value" else names[-1], s)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill_at, state))


@nnx.jit
def nnx_call(module, x):
    """``module(x)`` compiled (one compile per module structure, not one per eager op)."""
    return module(x)


def rel_err(got, want) -> float:
    """Max abs difference relative to the largest reference magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def leaves_equal(a, b) -> bool:
    """Same structure and bitwise-equal leaves."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
