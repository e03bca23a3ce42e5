"""Reference models used by tests, benchmarks, notebooks and the main job.

All linen models take ``(x, train=False)``: ``train=True`` uses batch statistics and
updates ``batch_stats``; ``train=False`` uses the running averages.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))`` on NHWC, as a reshape and a max.

    Same values. Its gradient splits an exact tie evenly where ``max_pool``'s gives it all
    to one entry; after a ReLU, ties sit at 0, where the ReLU passes no gradient anyway,
    unless two positive values are exactly equal. XLA's CPU backend runs ``max_pool``'s
    gradient (select-and-scatter) slowly: this makes the student's training about 3x
    faster there.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]  # VALID padding drops an odd last row/column
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class TeacherCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU blocks and a Dense head; about 190k parameters."""

    features: Sequence[int] = (32, 64, 64)
    hidden: int = 128
    num_classes: int = 10
    axis_name: str | None = None  # set to the pmap axis to sync BatchNorm statistics

    def resized(self, widths):
        """This model with the given hidden widths (for `jaxopt_lab.compact`)."""
        n = len(self.features)
        return self.clone(features=tuple(widths[:n]), hidden=widths[n])

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, f in enumerate(self.features):
            x = nn.Conv(f, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, axis_name=self.axis_name
            )(x)
            x = nn.relu(x)
            if i == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class StudentCNN(nn.Module):
    """One Conv -> BatchNorm -> ReLU block, pooling and a small head; about 17k parameters."""

    features: int = 16
    hidden: int = 64
    num_classes: int = 10
    axis_name: str | None = None  # set to the pmap axis to sync BatchNorm statistics

    def resized(self, widths):
        """This model with the given hidden widths (for `jaxopt_lab.compact`)."""
        return self.clone(features=widths[0], hidden=widths[1])

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, axis_name=self.axis_name
        )(x)
        x = nn.relu(x)
        x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """A plain multi-layer perceptron on flattened inputs."""

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10

    def resized(self, widths):
        """This model with the given hidden widths (for `jaxopt_lab.compact`)."""
        return self.clone(hidden=tuple(widths))

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class NNXMLP(nnx.Module):
    """A small Flax NNX model: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, din: int = 64, hidden: int = 64, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.bn(self.linear1(x))))


def param_count(params) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))


def init_model(model: nn.Module, x, seed: int = 0):
    """Initialises a linen model on an example batch; returns its variables dict."""
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
