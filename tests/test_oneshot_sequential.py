"""Sequential calibration: each block's statistics come from the compressed blocks'
outputs, one block's statistics at a time; no data is an error."""

import doctest
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.oneshot import block_stats, gptq, sequential


def _capture(p, x):
    return jnp.tanh(x @ p["kernel"]), {"kernel": x}


@given(st.integers(0, 2**31 - 1))
def test_each_block_sees_the_compressed_outputs(seed):
    rng = np.random.default_rng(seed)
    blocks = [{"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)} for _ in range(3)]
    batches = [jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2)]
    seen = []

    def compress(i, p, stats):
        seen.append(stats)
        return gptq(p, stats, bits=4)

    out = sequential(blocks, batches, capture=_capture, compress=compress)
    assert all(type(b["kernel"]).__name__ == "QTensor" for b in out)
    # Manual: block 2's inputs are the outputs of the dequantized blocks 0 and 1.
    xs = batches
    for i in range(2):
        xs = [_capture(jol.dequantize(out[i]), x)[0] for x in xs]
    ref, _ = block_stats(_capture, blocks[2], xs)
    np.testing.assert_allclose(seen[2]["kernel"].xtx, ref["kernel"].xtx, rtol=1e-5, atol=1e-5)
    assert int(seen[2]["kernel"].count) == 32


def test_no_calibration_data():
    with pytest.raises(ValueError, match="no calibration data"):
        sequential([{"kernel": jnp.eye(2)}], [], capture=_capture,
                   compress=lambda i, p, s: p)


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.sequential")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
