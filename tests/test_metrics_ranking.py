"""roc_auc against scikit-learn: ties, weights, multiclass averages, jit, degenerate input."""

import functools
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from jaxopt_lab import metrics as M

SIZES = st.sampled_from([2, 3, 5, 8, 13, 40])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@functools.cache
def jitted(**kwargs):
    return jax.jit(partial(M.roc_auc, **kwargs))


def sklearn_auc(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.roc_auc_score(*args, **kwargs)


def binary_case(data, n, classes):
    """Two-class labels (both present) and scores from a few values, so ties are common."""
    y = np.array(data.draw(st.lists(st.sampled_from(classes), min_size=n, max_size=n)))
    y[:2] = classes
    values = data.draw(st.sampled_from([[0.0, 0.5, 1.0], [-2.0, -0.0, 0.0, 3.5], None]))
    if values is None:  # continuous scores, ties unlikely
        # No subnormals: XLA flushes them to zero, so they would tie with 0.0 (documented).
        score = data.draw(st.lists(st.floats(-1e3, 1e3, allow_subnormal=False),
                                   min_size=n, max_size=n))
    else:
        score = data.draw(st.lists(st.sampled_from(values), min_size=n, max_size=n))
    return y, np.array(score)


def probabilities(data, n, c):
    """Rows of small integer counts, normalised: valid probabilities with many ties."""
    counts = data.draw(st.lists(st.lists(st.integers(0, 3), min_size=c, max_size=c),
                                min_size=n, max_size=n))
    counts = np.array(counts, float) + np.array([1.0] + [0.0] * (c - 1))
    return counts / counts.sum(axis=1, keepdims=True)


def weights_or_none(data, n):
    w = data.draw(st.none() | st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    return None if w is None else np.array(w)


@given(data=st.data(), n=SIZES, classes=st.sampled_from([(0, 1), (-1, 1), (2, 5)]))
def test_binary_matches_sklearn_with_ties_and_weights(data, n, classes):
    y, score = binary_case(data, n, classes)
    weight = weights_or_none(data, n)
    expected = sklearn_auc(y, score, sample_weight=weight)
    np.testing.assert_allclose(M.roc_auc(y, score, sample_weight=weight), expected, atol=1e-6)


@given(data=st.data(), n=st.sampled_from([6, 24]), c=st.sampled_from([3, 5]),
       average=st.sampled_from(["macro", "weighted", "micro", None]))
def test_multiclass_ovr_matches_sklearn(data, n, c, average):
    y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    y[:c] = data.draw(st.permutations(range(c)))  # every class present, as sklearn needs
    probs = probabilities(data, n, c)
    weight = weights_or_none(data, n)
    kwargs = dict(average=average, sample_weight=weight)
    expected = sklearn_auc(y, probs, multi_class="ovr", **kwargs)
    np.testing.assert_allclose(M.roc_auc(y, probs, **kwargs), expected, atol=1e-6)


def test_labels_name_the_columns_and_absent_classes_follow_sklearn():
    y = np.array([10, 30, 30, 10, 30])
    probs = np.array([[0.6, 0.1, 0.3], [0.2, 0.2, 0.6], [0.1, 0.4, 0.5], [0.5, 0.3, 0.2],
                      [0.3, 0.3, 0.4]])
    labels = [10, 20, 30]
    # "weighted" ignores a class with no support (sklearn zeroes its NaN score) ...
    expected = sklearn_auc(y, probs, multi_class="ovr", labels=labels, average="weighted")
    np.testing.assert_allclose(M.roc_auc(y, probs, labels=labels, average="weighted"), expected)
    # ... while "macro" is undefined: sklearn gives NaN, we raise (NaN under jit).
    assert np.isnan(sklearn_auc(y, probs, multi_class="ovr", labels=labels))
    with pytest.raises(ValueError, match="no positive or no negative"):
        M.roc_auc(y, probs, labels=labels)
    assert np.isnan(jitted(labels=tuple(labels))(jnp.asarray(y), jnp.asarray(probs)))


AVERAGES = ("macro", "weighted", "micro", None)


@jax.jit
def every_average(y, score, weight):
    """All averages in one compiled function (one compile per input shape)."""
    return [M.roc_auc(y, score, average=a, sample_weight=weight) for a in AVERAGES]


@settings(max_examples=12)
@given(data=st.data(), binary=st.booleans())
def test_jit_equals_eager(data, binary):
    n = 16
    if binary:
        y, score = binary_case(data, n, (0, 1))
    else:
        y = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
        y[:4] = [0, 1, 2, 3]
        score = probabilities(data, n, 4)
    weight = np.array(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n)))
    for average, out in zip(AVERAGES, every_average(y, score, weight)):
        eager = M.roc_auc(y, score, average=average, sample_weight=weight)
        np.testing.assert_allclose(out, eager, atol=1e-12)


def test_float32_agrees_with_sklearn():
    rng = np.random.default_rng(0)
    y, score = rng.integers(0, 2, 300), rng.normal(size=300).astype(np.float32)
    with jax.enable_x64(False):
        ours = M.roc_auc(y, score)
        assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, skm.roc_auc_score(y, score), atol=1e-6)


def test_one_class_raises_when_concrete_and_is_nan_under_jit():
    y, score = np.array([1, 1, 1]), np.array([0.1, 0.5, 0.2])
    assert np.isnan(sklearn_auc(y, score))
    with pytest.raises(ValueError, match="exactly two classes"):
        M.roc_auc(y, score)
    assert np.isnan(jitted()(jnp.asarray(y), jnp.asarray(score)))


def test_constant_scores_give_one_half():
    y, score = np.array([0, 1, 0, 1, 1]), np.full(5, 0.3)
    np.testing.assert_allclose(M.roc_auc(y, score), skm.roc_auc_score(y, score))
    np.testing.assert_allclose(M.roc_auc(y, score), 0.5)


PROBS = np.array([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
BAD_INPUTS = [
    (([0, 1, 1], [0.1, 0.2]), {}, "different numbers of samples"),
    (([], []), {}, "empty"),
    (([0, 1], np.zeros((2, 2, 2))), {}, "rank 1 or 2"),
    (([0, 1], [0.1, np.nan]), {}, "NaN"),
    (([0, 1, 2], [0.1, 0.2, 0.3]), {}, r"\(N, C\) probabilities"),
    (([0, 1, 0], PROBS * 2), {}, "sum to 1"),
    (([0, 1, 2], PROBS), {}, "3 classes"),
    (([0, 1, 0], PROBS), {"labels": [1, 0]}, "sorted"),
    (([0, 1, 0], PROBS), {"labels": [0, 2]}, r"labels \[1\] not in labels"),
    (([0, 1, 0], PROBS), {"average": "binary"}, "not supported"),
    # binary scores ignore the average, but a misspelt one still raises (as in sklearn)
    (([0, 1, 0], [0.1, 0.9, 0.3]), {"average": "macr"}, "not supported"),
    (([0, 1, 0], PROBS), {"multi_class": "ovo"}, "only 'ovr'"),
]


@pytest.mark.parametrize("args, kwargs, match", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_problem(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.roc_auc(*args, **kwargs)
