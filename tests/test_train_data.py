"""Data: stratified deterministic splits, normalisation, batching, validation."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.app import datasets
from jaxopt_lab.train import data as D


def test_digits_split_is_deterministic_stratified_and_disjoint():
    a, b = datasets.load_digits(seed=3), datasets.load_digits(seed=3)
    for s1, s2 in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(s1.x, s2.x)
        np.testing.assert_array_equal(s1.y, s2.y)
    assert a.num_classes == 10
    assert a.train.x.shape[1:] == (8, 8, 1) and a.train.x.dtype == np.float32
    n = len(a.train.y) + len(a.val.y) + len(a.test.y)
    assert n == 1797
    full = np.bincount(np.concatenate([a.train.y, a.val.y, a.test.y]), minlength=10) / n
    for split, frac in ((a.train, 0.7), (a.test, 0.2)):
        assert abs(len(split.y) / n - frac) < 0.01
        np.testing.assert_allclose(np.bincount(split.y, minlength=10) / len(split.y), full, atol=0.01)
    assert not np.array_equal(datasets.load_digits(seed=4).train.y, a.train.y)
    # Normalised with train statistics.
    assert abs(float(a.train.x.mean())) < 1e-5 and abs(float(a.train.x.std()) - 1) < 1e-4


@given(
    n=st.integers(10, 200),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_partitions_every_example_once(n, classes, seed):
    y = np.arange(n) % classes
    idx = D.stratified_split(y, (0.6, 0.2, 0.2), seed)
    allidx = np.concatenate(idx)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@given(n=st.integers(1, 130), bs=st.integers(1, 40), shards=st.sampled_from([None, 1, 2, 4]))
def test_batches_cover_epoch_without_repeats(n, bs, shards):
    split = D.Split(np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int32) % 3)
    if shards is not None and bs % shards:
        with pytest.raises(ValueError, match="divisible"):
            list(D.batches(split, bs, num_shards=shards))
        return
    got = list(D.batches(split, bs, seed=1, epoch=2, num_shards=shards))
    seen = np.concatenate([x.reshape(-1) for x, _ in got]) if got else np.zeros(0)
    assert len(seen) == n - n % bs
    assert len(np.unique(seen)) == len(seen)
    for x, y in got:
        if shards is not None:
            assert x.shape[:2] == (shards, bs // shards) and y.shape == (shards, bs // shards)
        np.testing.assert_array_equal(np.asarray(x).reshape(-1) % 3, np.asarray(y).reshape(-1))
    again = list(D.batches(split, bs, seed=1, epoch=2, num_shards=shards))
    for (x1, _), (x2, _) in zip(got, again):
        np.testing.assert_array_equal(x1, x2)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((3, 2)), np.zeros(4, int), "3 examples but y has 4"),
        (np.zeros((0, 2)), np.zeros(0, int), "empty"),
        (np.zeros(5), np.zeros(5, int), "rank >= 2"),
        (np.zeros((5, 2)), np.zeros((5, 1), int), "rank 1"),
        (np.zeros((5, 2)), np.array([0, 1, -1, 0, 1]), ">= 0"),
        (np.zeros((5, 2)), np.array([0, 1, 0.5, 0, 1]), "integers"),
        (np.full((5, 2), np.nan), np.zeros(5, int), "NaN"),
    ],
)
def test_bad_input_names_the_problem(x, y, match):
    with pytest.raises(ValueError, match=match):
        D.make_dataset(x, y)


def test_label_out_of_range_for_num_classes():
    with pytest.raises(ValueError, match="out of range"):
        D.make_dataset(np.zeros((6, 2)), np.array([0, 1, 2, 3, 4, 5]), num_classes=3)


def test_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), rng.integers(0, 3, 60)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    ds = datasets.load_npz(path, seed=1)
    assert ds.num_classes == 3 and ds.train.x.shape[1] == 4
    assert len(ds.train.y) + len(ds.val.y) + len(ds.test.y) == 60
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "wrong.npz", a=x)
    with pytest.raises(ValueError, match="'x' and 'y'"):
        datasets.load_npz(tmp_path / "wrong.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable"):
        datasets.load_npz(tmp_path / "junk.npz")


@given(scale=st.sampled_from([3e38, 1e38, 1e30, 1e-38, 1e-45]), shift=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 3))
def test_normalize_huge_or_tiny_finite_inputs_stays_finite(scale, shift, seed):
    """Statistics in float64: finite float32 inputs near float32's max (whose float32 sums
    overflowed to inf/NaN) or tiny ones give finite, standardised outputs."""
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], (30, 2))
    x = (sign * np.float32(scale) + np.float32(shift)).astype(np.float32)
    ds = D.make_dataset(x, np.arange(30) % 3, seed=seed)
    for split in ds[:3]:
        assert split.x.dtype == np.float32 and np.isfinite(split.x).all()
    train = ds.train.x.astype(np.float64)
    assert abs(train.mean()) < 1e-5 and (abs(train.std() - 1) < 1e-4 or train.std() == 0)
    x = np.full((6, 2), 3e38, np.float32) * np.array([[1.0], [-1.0]] * 3, np.float32)
    assert np.isfinite(D.make_dataset(x, np.arange(6) % 2).train.x).all()  # the fuzz reproducer
