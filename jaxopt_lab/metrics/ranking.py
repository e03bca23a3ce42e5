"""ROC AUC from scores, binary and one-vs-rest multiclass, exact with ties.

The area under the ROC curve equals the probability that a random positive scores
above a random negative, ties counting one half (the Mann-Whitney statistic with
average ranks). Computing it that way from two sorts gives the same number as sklearn's
trapezoid over the distinct thresholds, weights included, in O(N log N) and under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxopt_lab.metrics import _checks

_MULTICLASS_AVERAGES = ("micro", "macro", "weighted", None)


def _binary_auc(positive: jax.Array, score: jax.Array, weight: jax.Array) -> jax.Array:
    """Weighted P(score_pos > score_neg) + P(tie) / 2; NaN without positives or negatives."""
    score = jnp.where(score == 0, 0, score)  # -0.0 and 0.0 are one threshold, as in sklearn
    w_pos, w_neg = positive * weight, (1 - positive) * weight
    is_positive = positive.astype(jnp.int32)

    def negatives_before_positives(tie_order):
        # Sorted by score, ties broken by tie_order: the negative weight placed before a
        # positive is the weight scoring lower, plus the tied weight when negatives sort
        # first among ties.
        *_, pos, neg = jax.lax.sort((score, tie_order, w_pos, w_neg), num_keys=2)
        return jnp.sum(pos * (jnp.cumsum(neg) - neg))

    below = negatives_before_positives(1 - is_positive)  # tied positives sort first
    at_or_below = negatives_before_positives(is_positive)  # tied negatives sort first
    # Clipped: float rounding of the weighted sums can land a hair outside [0, 1].
    auc = jnp.clip(0.5 * (below + at_or_below) / (jnp.sum(w_pos) * jnp.sum(w_neg)), 0, 1)
    return jnp.where(jnp.isnan(score).any(), jnp.nan, auc)


_binary_auc_jit = jax.jit(_binary_auc)


@jax.jit
def _per_class_auc(one_hot, y_score, weight):
    """One-vs-rest AUC of every column, and each class's (weighted) support."""
    per_class = jax.vmap(_binary_auc, in_axes=(1, 1, None))(one_hot, y_score, weight)
    return per_class, jnp.sum(one_hot * weight[:, None], axis=0)


def _roc_auc(y_true, y_score, classes, weight, average):
    dtype = weight.dtype
    if y_score.ndim == 1:
        # sklearn's binary case: the larger of the two labels is the positive class.
        return _binary_auc_jit((y_true == jnp.max(y_true)).astype(dtype), y_score, weight)
    one_hot = (y_true[:, None] == classes[None, :]).astype(dtype)
    if average == "micro":
        flat_weight = jnp.repeat(weight, classes.shape[0])
        return _binary_auc_jit(one_hot.ravel(), y_score.ravel(), flat_weight)
    per_class, support = _per_class_auc(one_hot, y_score, weight)
    if average is None:
        return per_class
    if average == "macro":
        return jnp.mean(per_class)
    # "weighted": by class support; sklearn zeroes the (NaN) scores of absent classes.
    per_class = jnp.where(support == 0, 0, per_class)
    total = jnp.sum(support)
    mean = jnp.sum(per_class * support) / jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, jnp.minimum(mean, 1), 0)  # rounding: never above 1


def _multiclass_classes(y_true, y_score, labels, num_classes) -> np.ndarray:
    """The label of each score column, with sklearn's consistency checks."""
    n_columns = y_score.shape[1]
    classes = _checks.class_labels(y_true, None, labels, num_classes)
    if classes is None:
        return np.arange(n_columns)
    if labels is not None and not np.array_equal(np.sort(classes), classes):
        raise ValueError(f"labels must be sorted, got {classes.tolist()}")
    if classes.size != n_columns:
        source = "y_true holds" if labels is None and num_classes is None else "labels give"
        raise ValueError(
            f"{source} {classes.size} classes {classes.tolist()} but y_score has "
            f"{n_columns} columns"
        )
    if not _checks.is_traced(y_true):
        unknown = np.setdiff1d(np.asarray(y_true), classes)
        if unknown.size:
            raise ValueError(f"y_true holds labels {unknown.tolist()} not in labels")
    if not _checks.is_traced(y_score):
        row_sums = np.asarray(y_score).sum(axis=1)
        if not np.allclose(row_sums, 1):
            i = int(np.argmax(np.abs(row_sums - 1)))
            raise ValueError(
                "multiclass roc_auc needs probabilities: rows of y_score must sum to 1, "
                f"row {i} sums to {row_sums[i]}"
            )
    return classes


def roc_auc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    average: str | None = "macro",
    multi_class: str = "ovr",
    labels: ArrayLike | None = None,
    num_classes: int | None = None,
    sample_weight: ArrayLike | None = None,
) -> jax.Array:
    """Area under the ROC curve, like sklearn's ``roc_auc_score``.

    Binary: ``y_score`` is ``(N,)`` and the larger of the two labels in ``y_true`` is the
    positive class (as in sklearn, e.g. 1 for {0, 1} or {-1, 1}). Multiclass:
    ``y_score`` is ``(N, C)`` class probabilities and the result is one-vs-rest.
    Tied scores count one half, exactly like sklearn's trapezoid over thresholds. (XLA
    flushes subnormal floats to zero, so scores below ~1e-308 tie with 0.0.)

    Where sklearn returns NaN with a warning (``y_true`` holding one class only, or a
    listed class absent from it under a macro average), this function raises a
    ``ValueError`` on concrete inputs and returns NaN under ``jit``.

    Args:
      y_true: ``(N,)`` true labels.
      y_score: ``(N,)`` scores of the positive class, or ``(N, C)`` probabilities.
      average: multiclass only: ``"macro"`` (mean of the per-class AUCs), ``"weighted"``
        (by class support), ``"micro"`` (one AUC over all one-vs-rest pairs) or ``None``
        (per-class AUCs). Ignored for binary scores, as in sklearn, but still checked.
      multi_class: only ``"ovr"`` (one-vs-rest) is implemented.
      labels: sorted labels of the ``C`` score columns. Default: the sorted labels in a
        concrete ``y_true`` (as sklearn), or ``0..C-1`` under ``jit``.
      num_classes: shorthand for ``labels=range(num_classes)``.
      sample_weight: optional ``(N,)`` non-negative weights.

    Returns:
      A scalar, or ``(C,)`` per-class AUCs for ``average=None``.

    Raises:
      ValueError: for mismatched lengths, empty inputs, wrong ranks, NaN/Inf, weights
        that are negative or sum to zero, a single class, columns that do not match the
        labels, rows that do not sum to 1, or an
        unsupported ``average``/``multi_class``. Value checks only on concrete inputs.

    Examples:
      >>> from jaxopt_lab import metrics
      >>> float(metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))
      0.75
      >>> probs = [[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]]
      >>> float(metrics.roc_auc([0, 1, 2, 1], probs))
      1.0
    """
    if multi_class != "ovr":
        raise ValueError(f"multi_class={multi_class!r} is not supported; only 'ovr' is")
    y_true = _checks.as_array("y_true", y_true, (1,))
    y_score = _checks.as_array("y_score", y_score, (1, 2))
    n = _checks.same_length(y_true=y_true, y_score=y_score)
    _checks.check_class_labels("y_true", y_true)
    _checks.check_finite("y_score", y_score)
    weight = _checks.sample_weights(sample_weight, n)
    dtype = _checks.float_dtype(y_score)
    weight = jnp.ones((n,), dtype) if weight is None else weight.astype(dtype)
    # Checked for binary scores too, where it is ignored: sklearn also rejects a misspelt
    # average there rather than let it pass silently.
    _checks.check_average(average, _MULTICLASS_AVERAGES)
    if y_score.ndim == 1:
        classes = np.zeros((1,))
        if not _checks.is_traced(y_true):
            present = np.unique(np.asarray(y_true))
            if present.size != 2:
                raise ValueError(
                    f"binary roc_auc needs exactly two classes in y_true, got "
                    f"{present.tolist()}" + (" (multiclass needs (N, C) probabilities)"
                                             if present.size > 2 else " (AUC is undefined)")
                )
    else:
        classes = _multiclass_classes(y_true, y_score, labels, num_classes)
    result = _roc_auc(y_true, y_score.astype(dtype), jnp.asarray(classes), weight, average)
    if not _checks.is_traced(y_true, y_score, weight) and np.isnan(np.asarray(result)).any():
        raise ValueError(
            "roc_auc is undefined: some class in labels has no positive or no negative "
            f"example in y_true (per-class result {np.asarray(result).tolist()})"
        )
    return result
