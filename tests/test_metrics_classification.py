"""accuracy / precision / recall / f1 against scikit-learn, under jit, pmap, and bad input."""

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

SIZES = st.sampled_from([1, 2, 3, 8, 40])
ALPHABETS = st.sampled_from([(0, 1, 2, 3, 4), (-3, 0, 2, 7, 11)])
AVERAGES = st.sampled_from(["micro", "macro", "weighted", None])
ZERO_DIVISION = st.sampled_from(["warn", 0.0, 1.0, np.nan])
PRF = {"precision": (M.precision, 0), "recall": (M.recall, 1), "f1": (M.f1, 2)}


@pytest.fixture(autouse=True)
def x64():
    """Compare with sklearn in float64, where 1e-6 agreement is meaningful."""
    with jax.enable_x64(True):
        yield


def labels_of(data, n, alphabet, k):
    return np.array(data.draw(st.lists(st.sampled_from(alphabet[:k]), min_size=n, max_size=n)))


def weights_or_none(data, n):
    w = data.draw(st.none() | st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    return None if w is None else np.array(w)


def sklearn_prf(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.precision_recall_fscore_support(*args, **kwargs)[:3]


def assert_close(ours, theirs, atol=1e-6):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs, float), rtol=0, atol=atol)


@given(data=st.data(), n=SIZES, k=st.integers(1, 5), alphabet=ALPHABETS, average=AVERAGES,
       zero_division=ZERO_DIVISION, explicit_labels=st.booleans())
def test_precision_recall_f1_match_sklearn(data, n, k, alphabet, average, zero_division,
                                           explicit_labels):
    y_true, y_pred = labels_of(data, n, alphabet, k), labels_of(data, n, alphabet, k)
    weight = weights_or_none(data, n)
    # A subset/superset of the classes, in any order, as sklearn allows.
    labels = (data.draw(st.lists(st.sampled_from(alphabet), min_size=1, max_size=5, unique=True))
              if explicit_labels else None)
    kwargs = dict(average=average, sample_weight=weight, zero_division=zero_division,
                  labels=labels)
    expected = sklearn_prf(y_true, y_pred, **kwargs)
    for fn, i in PRF.values():
        assert_close(fn(y_true, y_pred, **kwargs), expected[i])


@given(data=st.data(), n=SIZES, classes=st.sampled_from([(0, 1), (-1, 1), (2, 5), (1,), (0,)]),
       zero_division=ZERO_DIVISION)
def test_binary_average_matches_sklearn_including_one_class(data, n, classes, zero_division):
    y_true, y_pred = labels_of(data, n, classes, 2), labels_of(data, n, classes, 2)
    pos_label = data.draw(st.sampled_from(classes if len(classes) == 2 else (1,)))
    weight = weights_or_none(data, n)
    kwargs = dict(pos_label=pos_label, sample_weight=weight, zero_division=zero_division)
    expected = sklearn_prf(y_true, y_pred, average="binary", **kwargs)
    for fn, i in PRF.values():
        assert_close(fn(y_true, y_pred, **kwargs), expected[i])


def test_bool_and_whole_float_labels_are_labels():
    yt, yp = np.array([True, False, True, True]), np.array([True, True, False, True])
    assert_close(M.f1(yt, yp), skm.f1_score(yt, yp))
    ft, fp = np.array([0.0, 2.0, 1.0, 2.0]), np.array([0.0, 2.0, 2.0, 1.0])
    assert_close(M.f1(ft, fp, average="macro"), skm.f1_score(ft, fp, average="macro"))


@given(data=st.data(), n=SIZES, k=st.integers(1, 5), normalize=st.booleans())
def test_accuracy_matches_sklearn(data, n, k, normalize):
    y_true, y_pred = labels_of(data, n, (0, 1, 2, 3, 4), k), labels_of(data, n, (0, 1, 2, 3, 4), k)
    weight = weights_or_none(data, n)
    expected = skm.accuracy_score(y_true, y_pred, normalize=normalize, sample_weight=weight)
    assert_close(M.accuracy(y_true, y_pred, normalize=normalize, sample_weight=weight),
                 expected, atol=1e-6 * max(1.0, abs(expected)))


CASES = [(fn, average) for fn in PRF for average in ("micro", "macro", "weighted", None)]


@functools.cache
def every_setting(k):
    """All metrics and averages for k classes in one compiled function (few compiles)."""
    def run(y_true, y_pred, weight):
        out = {f"{name}/{a}": PRF[name][0](y_true, y_pred, average=a, num_classes=k,
                                             sample_weight=weight) for name, a in CASES}
        out["binary"] = [fn(y_true, y_pred, sample_weight=weight) for fn, _ in PRF.values()]
        out["accuracy"] = M.accuracy(y_true, y_pred, sample_weight=weight)
        return out
    return jax.jit(run)


@settings(max_examples=12)
@given(data=st.data(), n=st.sampled_from([4, 16]), k=st.sampled_from([2, 4]))
def test_jit_equals_eager_with_num_classes(data, n, k):
    y_true, y_pred = labels_of(data, n, range(k), k), labels_of(data, n, range(k), k)
    weight = np.array(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n)))
    jitted_out = every_setting(k)(jnp.asarray(y_true), jnp.asarray(y_pred), jnp.asarray(weight))
    for name, average in CASES:
        eager = PRF[name][0](y_true, y_pred, average=average, num_classes=k, sample_weight=weight)
        assert_close(jitted_out[f"{name}/{average}"], eager, atol=1e-12)
    if k == 2:
        eager = [fn(y_true, y_pred, sample_weight=weight) for fn, _ in PRF.values()]
        assert_close(jitted_out["binary"], eager, atol=1e-12)
    assert_close(jitted_out["accuracy"], M.accuracy(y_true, y_pred, sample_weight=weight),
                 atol=1e-12)


def test_float32_agrees_within_float32_precision():
    rng = np.random.default_rng(0)
    y_true, y_pred, w = rng.integers(0, 6, 500), rng.integers(0, 6, 500), rng.uniform(0, 3, 500)
    with jax.enable_x64(False):
        ours = M.f1(y_true, y_pred, average="weighted", sample_weight=w)
        assert ours.dtype == jnp.float32
    assert_close(ours, skm.f1_score(y_true, y_pred, average="weighted", sample_weight=w), 1e-6)


def test_axis_name_sums_counts_over_devices():
    rng = np.random.default_rng(1)
    devices = jax.local_device_count()
    y_true, y_pred = rng.integers(0, 3, (devices, 4)), rng.integers(0, 3, (devices, 4))
    shard = lambda f: jax.pmap(f, axis_name="d")(y_true, y_pred)[0]  # noqa: E731
    flat = y_true.ravel(), y_pred.ravel()
    got = shard(partial(M.f1, average="macro", num_classes=3, axis_name="d"))
    assert_close(got, skm.f1_score(*flat, average="macro"))
    assert_close(shard(partial(M.accuracy, axis_name="d")), skm.accuracy_score(*flat))


BAD_INPUTS = [
    (M.f1, ([0, 1, 1], [0, 1]), {}, "different numbers of samples"),
    (M.f1, ([], []), {}, "empty"),
    (M.accuracy, ([[0, 1]], [[0, 1]]), {}, "rank 1"),
    (M.recall, ([0.0, np.nan], [0, 1]), {}, "NaN"),
    (M.precision, ([0.5, 1.0], [0, 1]), {}, "non-integer"),
    (M.f1, ([0, 3], [0, 1]), {"average": "macro", "num_classes": 3}, "out of range"),
    (M.f1, ([0, 1], [0, 1]), {"average": "samples"}, "not supported"),
    (M.f1, ([0, 1, 2], [0, 1, 1]), {}, "average='binary'"),
    (M.f1, ([0, 2], [2, 0]), {"pos_label": 1}, "pos_label=1"),
    (M.f1, ([0, 1], [0, 1]), {"zero_division": 2}, "zero_division"),
    (M.f1, ([0, 1], [0, 1]), {"labels": [0, 1], "num_classes": 2}, "not both"),
    (M.f1, ([0, 1], [0, 1]), {"labels": [1, 1]}, "unique"),
    (M.accuracy, ([0, 1], [0, 1]), {"sample_weight": [1.0, -1.0]}, ">= 0"),
    (M.accuracy, ([0, 1], [0, 1]), {"sample_weight": [1.0]}, "sample_weight has 1"),
    (M.accuracy, ([0, 1], [0, 1]), {"sample_weight": [0.0, 0.0]}, "sums to zero"),
]


@pytest.mark.parametrize("fn, args, kwargs, match", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_problem(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_non_binary_average_under_jit_needs_the_class_set():
    with pytest.raises(ValueError, match="num_classes= or labels="):
        jax.jit(partial(M.f1, average="macro"))(jnp.array([0, 1]), jnp.array([1, 1]))
    with pytest.raises(ValueError, match="rank 1"):
        jax.jit(partial(M.f1, num_classes=2))(jnp.zeros((2, 2), int), jnp.zeros((2, 2), int))
