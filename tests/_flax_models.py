"""Models users bring, built from stock Flax layers in both APIs, for the model-aware tests.

* `LinenTransformer`: ``nn.Embed`` with ``attend`` as the tied output head,
  ``nn.MultiHeadDotProductAttention``, ``nn.DenseGeneral`` (features as a tuple),
  ``nn.Einsum``, ``nn.LayerNorm`` and ``nn.RMSNorm``; ``partitioned=True`` gives every
  kernel and the embedding logical partitioning metadata (``LogicallyPartitioned`` boxes).
* `NnxTransformer`: the same with ``nnx.Embed``, ``nnx.MultiHeadAttention``,
  ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.LayerNorm`` and ``nnx.RMSNorm``.
* `LinenConvNet` / `NnxConvNet`: conv nets whose first conv reads 1 or 3 channels, with
  BatchNorm after each conv.

Sizes make every Dense/attention kernel's contraction a multiple of 128, so int4 with
128-element groups fits all of them with no override; the conv nets' first convs never fit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, EMBED, HEADS, HEAD_DIM, MLP = 64, 128, 4, 32, 256


def _init(partitioned: bool, names):
    init = nn.initializers.lecun_normal()
    return nn.with_logical_partitioning(init, names) if partitioned else init


class LinenBlock(nn.Module):
    partitioned: bool = False

    @nn.compact
    def __call__(self, x):
        p = self.partitioned
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=HEADS, qkv_features=HEADS * HEAD_DIM,
            kernel_init=_init(p, ("embed", "heads", "kv")))(h, h)
        x = x + h
        h = nn.RMSNorm()(x)
        h = nn.DenseGeneral((2, MLP // 2), kernel_init=_init(p, ("embed", "mlp", None)))(h)
        h = nn.gelu(h)
        h = nn.Einsum((2, MLP // 2, EMBED), "btnh,nhd->btd",
                      kernel_init=_init(p, ("mlp", None, "embed")))(h)
        return x + h


class LinenTransformer(nn.Module):
    partitioned: bool = False
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, EMBED, embedding_init=_init(self.partitioned, ("vocab", "embed"))
                         if self.partitioned else nn.initializers.normal(1.0))
        x = embed(ids)
        for _ in range(self.layers):
            x = LinenBlock(self.partitioned)(x)
        x = nn.LayerNorm()(x)
        x = nn.Dense(EMBED, kernel_init=_init(self.partitioned, ("embed", "embed2")))(x)
        return embed.attend(x)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(EMBED, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=EMBED,
                                           qkv_features=HEADS * HEAD_DIM, decode=False,
                                           rngs=rngs)
        self.norm2 = nnx.RMSNorm(EMBED, rngs=rngs)
        self.up = nnx.LinearGeneral(EMBED, (2, MLP // 2), rngs=rngs)
        self.down = nnx.Einsum("btnh,nhd->btd", (2, MLP // 2, EMBED), (EMBED,), rngs=rngs)

    def __call__(self, x):
        h = self.norm1(x)
        x = x + self.attn(h)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, layers: int = 2):
        self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(layers)]) \
            if hasattr(nnx, "List") else [NnxBlock(rngs) for _ in range(layers)]
        self.norm = nnx.LayerNorm(EMBED, rngs=rngs)
        self.head = nnx.Linear(EMBED, EMBED, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.head(self.norm(x)))


class LinenConvNet(nn.Module):
    features: tuple[int, ...] = (16, 32)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for f in self.features:
            x = nn.Conv(f, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(x)


class NnxConvNet(nnx.Module):
    def __init__(self, in_channels: int, rngs: nnx.Rngs, features=(16, 32)):
        chans = (in_channels, *features)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), use_bias=False, rngs=rngs)
                               for a, b in zip(chans, chans[1:])]) \
            if hasattr(nnx, "List") else [nnx.Conv(a, b, (3, 3), use_bias=False, rngs=rngs)
                                           for a, b in zip(chans, chans[1:])]
        self.bns = nnx.List([nnx.BatchNorm(b, use_running_average=True, rngs=rngs)
                             for b in features]) \
            if hasattr(nnx, "List") else [nnx.BatchNorm(b, use_running_average=True, rngs=rngs)
                                           for b in features]
        self.head = nnx.Linear(features[-1], 10, rngs=rngs)

    def __call__(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = nnx.relu(bn(conv(x)))
        return self.head(x.mean(axis=(1, 2)))


def token_ids(batch: int = 2, length: int = 8, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB)


def images(channels: int, batch: int = 2, size: int = 8, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, channels))


def linen_transformer(partitioned: bool = False):
    model = LinenTransformer(partitioned)
    ids = token_ids()
    return model, model.init(jax.random.PRNGKey(0), ids), ids


def nnx_transformer():
    return NnxTransformer(nnx.Rngs(0)), token_ids()


def linen_convnet(channels: int):
    model = LinenConvNet()
    x = images(channels)
    return model, model.init(jax.random.PRNGKey(0), x), x


def nnx_convnet(channels: int):
    return NnxConvNet(channels, nnx.Rngs(0)), images(channels)


def unbox(tree):
    return nn.meta.unbox(tree)


__all__ = ["jnp"]
