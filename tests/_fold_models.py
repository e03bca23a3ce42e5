"""Small stock-layer transformer blocks (linen and NNX) for the fold-target tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, HEADS, FFN = 8, 2, 16


class PreLN(nn.Module):
    """Pre-LN block: LN -> attention (stock), RMSNorm -> GELU MLP, LN -> ReLU MLP + max-pool."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(
            nn.LayerNorm(name="ln0")(x))
        h = nn.Dense(FFN, name="gelu_in")(nn.RMSNorm(name="rms")(x))
        x = x + nn.Dense(D, name="gelu_out")(nn.gelu(h))
        h = nn.relu(nn.Dense(FFN, name="relu_in")(nn.LayerNorm(name="ln1")(x)))
        h = nn.max_pool(h, (2,), strides=(1,), padding="SAME")
        return x + nn.Dense(D, name="relu_out")(h)


class HandAttention(nn.Module):
    """LN -> Dense q/k/v -> heads -> softmax(QK) V -> DenseGeneral over (heads, head_dim)."""

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        h = nn.LayerNorm(name="ln")(x)
        heads = lambda y: y.reshape(b, t, HEADS, D // HEADS)  # noqa: E731
        q, k, v = (heads(nn.Dense(D, name=n)(h)) for n in ("q", "k", "v"))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(ctx)


class PostLN(nn.Module):
    """The bench's MiniLM block structure (post-LN BERT), small."""

    @nn.compact
    def __call__(self, h):
        b, t, _ = h.shape
        heads = lambda y: y.reshape(b, t, HEADS, D // HEADS)  # noqa: E731
        q, k, v = (heads(nn.Dense(D, name=n)(h)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, D)
        a = nn.LayerNorm(name="ln_attn")(h + nn.Dense(D, name="attn_out")(ctx))
        mid = jax.nn.gelu(nn.Dense(FFN, name="intermediate")(a), approximate=False)
        return nn.LayerNorm(name="ln_out")(a + nn.Dense(D, name="output")(mid))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.rms = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, FFN, rngs=rngs)
        self.down = nnx.Linear(FFN, D, rngs=rngs)
        self.rms2 = nnx.RMSNorm(D, rngs=rngs)
        self.gup = nnx.Linear(D, FFN, rngs=rngs)
        self.gdown = nnx.Linear(FFN, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln(x))
        x = x + self.down(nnx.relu(self.up(self.rms(x))))
        return x + self.gdown(nnx.gelu(self.gup(self.rms2(x))))
