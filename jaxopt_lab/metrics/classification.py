"""Label metrics: accuracy, precision, recall and F1, as scikit-learn computes them.

The class set decides what macro/weighted/micro averages mean. With concrete inputs it
is inferred like sklearn, as the sorted union of the values in ``y_true`` and ``y_pred``.
Under ``jit`` the values are unknown, so pass ``num_classes`` (labels ``0..C-1``) or
``labels``; ``average="binary"`` and ``accuracy`` need neither.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxopt_lab.metrics import _checks


def _label_inputs(y_true, y_pred, sample_weight):
    y_true = _checks.as_array("y_true", y_true, (1,))
    y_pred = _checks.as_array("y_pred", y_pred, (1,))
    n = _checks.same_length(y_true=y_true, y_pred=y_pred)
    _checks.check_class_labels("y_true", y_true)
    _checks.check_class_labels("y_pred", y_pred)
    return y_true, y_pred, _checks.sample_weights(sample_weight, n)


def _weights_or_ones(weight: jax.Array | None, n: int, dtype) -> jax.Array:
    return jnp.ones((n,), dtype) if weight is None else weight.astype(dtype)


def _psum(x, axis_name: str | None):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


@functools.partial(jax.jit, static_argnames=("normalize", "axis_name"))
def _accuracy(y_true, y_pred, weight, *, normalize, axis_name):
    dtype = _checks.float_dtype(weight)
    correct = jnp.sum(weight * (y_true == y_pred).astype(dtype))
    correct, total = _psum((correct, jnp.sum(weight)), axis_name)
    return correct / total if normalize else correct


def accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    normalize: bool = True,
    sample_weight: ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Fraction (or weighted count) of exact label matches, like ``accuracy_score``.

    Args:
      y_true: ``(N,)`` true labels.
      y_pred: ``(N,)`` predicted labels.
      normalize: return the fraction; ``False`` returns the (weighted) number correct.
      sample_weight: optional ``(N,)`` non-negative weights.
      axis_name: a ``pmap``/``shard_map`` axis over which the samples are split; the
        counts are summed over it so every device gets the global accuracy.

    Returns:
      A scalar.

    Raises:
      ValueError: for mismatched lengths, empty or non-1-D inputs, NaN or non-integer
        labels, or weights that are negative or sum to zero (value checks only on
        concrete inputs).

    Examples:
      >>> from jaxopt_lab import metrics
      >>> float(metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]))
      0.75
    """
    y_true, y_pred, weight = _label_inputs(y_true, y_pred, sample_weight)
    weight = _weights_or_ones(weight, y_true.shape[0], _checks.float_dtype(y_true, y_pred))
    return _accuracy(y_true, y_pred, weight, normalize=normalize, axis_name=axis_name)


def _safe_divide(num, den, zero_division):
    return jnp.where(den == 0, zero_division, num / jnp.where(den == 0, 1, den))


def _nanaverage(values, weights=None):
    """sklearn's ``_nanaverage``: NaN entries dropped; all-zero weights mean unweighted."""
    valid = ~jnp.isnan(values)
    values = jnp.where(valid, values, 0)
    plain = jnp.sum(values) / jnp.sum(valid)
    if weights is None:
        return plain
    weights = jnp.where(valid, weights, 0)
    total = jnp.sum(weights)
    weighted = jnp.sum(values * weights) / jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, weighted, plain)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _confusion_counts(y_true, y_pred, labels, weight, *, axis_name):
    """Per-label (weighted) true positives, true counts and predicted counts."""
    dtype = weight.dtype
    is_true = (y_true[:, None] == labels[None, :]).astype(dtype)
    is_pred = (y_pred[:, None] == labels[None, :]).astype(dtype)
    w = weight[:, None]
    counts = (jnp.sum(is_true * is_pred * w, 0), jnp.sum(is_true * w, 0), jnp.sum(is_pred * w, 0))
    return _psum(counts, axis_name)


def _prf(tp, true_sum, pred_sum, zero_division, average):
    """Precision, recall and F1 from one-vs-rest counts, averaged as sklearn does."""
    if average == "micro":
        tp, true_sum, pred_sum = jnp.sum(tp), jnp.sum(true_sum), jnp.sum(pred_sum)
    precision = _safe_divide(tp, pred_sum, zero_division)
    recall = _safe_divide(tp, true_sum, zero_division)
    f1 = _safe_divide(2 * tp, true_sum + pred_sum, zero_division)
    scores = jnp.stack([precision, recall, f1])
    if average is None:
        return scores
    if average in ("micro", "binary"):
        return scores.reshape(3, -1)[:, 0]
    weights = true_sum if average == "weighted" else None
    return jnp.stack([_nanaverage(s, weights) for s in scores])


def _binary_label(y_true, y_pred, pos_label) -> np.ndarray:
    """sklearn's ``average="binary"`` checks: at most two classes, pos_label among them."""
    if pos_label is None:
        raise ValueError("average='binary' needs a pos_label")
    if not _checks.is_traced(y_true, y_pred):
        present = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]))
        if present.size > 2:
            raise ValueError(
                f"average='binary' but the targets hold {present.size} classes "
                f"{present.tolist()}; choose average='micro', 'macro', 'weighted' or None"
            )
        if pos_label not in present and present.size == 2:
            raise ValueError(f"pos_label={pos_label!r} is not one of the labels {present.tolist()}")
    return np.asarray([pos_label])


def _scores(y_true, y_pred, *, labels, num_classes, pos_label, average, sample_weight,
            zero_division, axis_name) -> jax.Array:
    _checks.check_average(average)
    zero_division = _checks.zero_division_value(zero_division)
    y_true, y_pred, weight = _label_inputs(y_true, y_pred, sample_weight)
    label_set = _checks.class_labels(y_true, y_pred, labels, num_classes)
    if average == "binary":  # sklearn ignores labels here, but they are still checked
        label_set = _binary_label(y_true, y_pred, pos_label)
    elif label_set is None:
        raise ValueError(
            f"average={average!r} under jit needs num_classes= or labels=: the class "
            "set cannot be inferred from traced values"
        )
    dtype = _checks.float_dtype(y_true, y_pred)
    weight = _weights_or_ones(weight, y_true.shape[0], dtype)
    counts = _confusion_counts(y_true, y_pred, jnp.asarray(label_set), weight,
                               axis_name=axis_name)
    return _prf(*counts, jnp.asarray(zero_division, dtype), average)


_PRF_DOC = """{summary}

    Args:
      y_true: ``(N,)`` true labels (integers, or floats holding whole numbers).
      y_pred: ``(N,)`` predicted labels.
      labels: the classes to score and average over (sklearn's ``labels``); must be
        concrete. Values outside it count as negatives for every listed class.
      num_classes: shorthand for ``labels=range(num_classes)``; use it under ``jit``,
        where the class set cannot be inferred. Concrete labels outside the range raise;
        under ``jit`` they cannot be checked and count as no listed class.
      pos_label: the positive class for ``average="binary"`` (ignored otherwise).
      average: ``"binary"`` (sklearn's default: the score of ``pos_label``; at most two
        classes), ``"micro"`` (global counts), ``"macro"`` (unweighted mean over labels),
        ``"weighted"`` (mean weighted by support) or ``None`` (per-label scores).
      sample_weight: optional ``(N,)`` non-negative weights.
      zero_division: the value where the ratio is 0/0. sklearn's default ``"warn"``
        gives 0.0 (no warning is issued here); also 0.0, 1.0 or NaN (NaN entries are then
        left out of macro/weighted averages, as in sklearn).
      axis_name: a ``pmap``/``shard_map`` axis over which the samples are split; the
        confusion counts are summed over it (needs ``num_classes``/``labels`` unless binary).

    Returns:
      A scalar, or ``(len(labels),)`` per-label scores for ``average=None``.

    Raises:
      ValueError: for mismatched lengths, empty or non-1-D inputs, NaN or non-integer
        labels, weights that are negative or sum to zero (sklearn would return
        ``zero_division``), labels outside ``num_classes``, an unsupported ``average``,
        more than two classes with ``average="binary"``, or a non-binary average under
        ``jit`` without ``num_classes``/``labels``. Value checks only on concrete inputs.

    Examples:
      >>> import jax
      >>> from functools import partial
      >>> from jaxopt_lab import metrics
      >>> y_true, y_pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
      >>> round(float(metrics.{name}(y_true, y_pred, average="macro")), 4)
      {value}
      >>> jitted = jax.jit(partial(metrics.{name}, average="macro", num_classes=3))
      >>> round(float(jitted(jax.numpy.array(y_true), jax.numpy.array(y_pred))), 4)
      {value}
    """


def _documented(summary: str, value: str):
    """Gives precision/recall/f1 the shared docstring, with their own summary and example."""
    def attach(fn):
        fn.__doc__ = _PRF_DOC.format(summary=summary, name=fn.__name__, value=value)
        return fn
    return attach


@_documented("Precision ``tp / (tp + fp)``, like sklearn's ``precision_score``.", "0.8889")
def precision(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    num_classes: int | None = None,
    pos_label: int | float | bool | None = 1,
    average: str | None = "binary",
    sample_weight: ArrayLike | None = None,
    zero_division: str | float = "warn",
    axis_name: str | None = None,
) -> jax.Array:
    return _scores(y_true, y_pred, labels=labels, num_classes=num_classes, pos_label=pos_label,
                   average=average, sample_weight=sample_weight, zero_division=zero_division,
                   axis_name=axis_name)[0]


@_documented("Recall ``tp / (tp + fn)``, like sklearn's ``recall_score``.", "0.8333")
def recall(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    num_classes: int | None = None,
    pos_label: int | float | bool | None = 1,
    average: str | None = "binary",
    sample_weight: ArrayLike | None = None,
    zero_division: str | float = "warn",
    axis_name: str | None = None,
) -> jax.Array:
    return _scores(y_true, y_pred, labels=labels, num_classes=num_classes, pos_label=pos_label,
                   average=average, sample_weight=sample_weight, zero_division=zero_division,
                   axis_name=axis_name)[1]


@_documented("F1 ``2 tp / (2 tp + fp + fn)``, like sklearn's ``f1_score``.", "0.8222")
def f1(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    num_classes: int | None = None,
    pos_label: int | float | bool | None = 1,
    average: str | None = "binary",
    sample_weight: ArrayLike | None = None,
    zero_division: str | float = "warn",
    axis_name: str | None = None,
) -> jax.Array:
    return _scores(y_true, y_pred, labels=labels, num_classes=num_classes, pos_label=pos_label,
                   average=average, sample_weight=sample_weight, zero_division=zero_division,
                   axis_name=axis_name)[2]
