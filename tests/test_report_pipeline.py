"""The composed pipeline's storage: pruned zeros survive quantization exactly."""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.app.report.pipeline import from_storage, kept_mask, to_storage

# A few shapes only: every new shape compiles the quantizer's ops again.
KERNELS = hnp.arrays(
    np.float32, st.sampled_from([(1, 1), (4, 6), (3, 3, 2, 5)]),
    elements=st.one_of(st.just(0.0), st.floats(-4, 4, width=32),
                       st.sampled_from([1e-30, -1e-30, 1e30])))


@settings(max_examples=20)
@given(KERNELS, st.floats(0.0, 0.95))
def test_zeros_stay_zero_and_codes_match_plain_quantization(kernel, prune):
    threshold = np.quantile(np.abs(kernel), prune)
    kernel = np.where(np.abs(kernel) <= threshold, np.float32(0), kernel)
    tree = {"kernel": kernel, "bias": np.ones(3, np.float32)}
    stored = to_storage(tree)
    back = from_storage(stored)
    assert np.all(np.asarray(back["kernel"])[kernel == 0] == 0)
    np.testing.assert_array_equal(np.asarray(back["kernel"]),
                                  np.asarray(jol.dequantize(jol.quantize(tree, bits=8))["kernel"]))
    np.testing.assert_array_equal(back["bias"], tree["bias"])


def test_sparse_codes_are_smaller_and_saved_exactly(tmp_path):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(64, 32)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.75] = 0
    stored = to_storage({"k": kernel})
    assert jol.tree_nbytes(stored) < jol.tree_nbytes(jol.quantize({"k": kernel}, bits=8))
    jol.save(tmp_path / "p.safetensors", stored)
    back = from_storage(jol.load(tmp_path / "p.safetensors"))
    np.testing.assert_array_equal(np.asarray(back["k"]), np.asarray(from_storage(stored)["k"]))


def test_kept_mask_marks_nonzero_kernels_and_keeps_the_rest():
    params = {"k": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32), "b": np.zeros(2, np.float32)}
    mask = kept_mask(params)
    assert mask["k"].tolist() == [[False, True], [True, False]]
    assert mask["b"].tolist() == [True, True]
    assert jax.tree.structure(mask) == jax.tree.structure(params)
