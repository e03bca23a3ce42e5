"""Classification and regression metrics in pure jnp, agreeing with scikit-learn.

Every metric is ``metric(y_true, y_pred_or_score, ...)`` with sklearn's argument order
and options, runs under ``jit`` (``jax.jit(partial(metrics.f1, average="macro",
num_classes=10))``), and validates its inputs: shapes always, values (NaN, labels out of
range, non-integer labels) when the inputs are concrete. Under ``jit`` the class set
cannot be read from the data, so pass ``num_classes`` or ``labels`` to the
classification metrics with a non-binary average.

Where sklearn returns NaN with a warning (ROC AUC of a single class, Pearson's r of a
constant input) these functions raise ``ValueError`` on concrete inputs and return NaN
under ``jit``. ``zero_division`` follows sklearn's default (0.0, without the warning).
"""

from jaxopt_lab.metrics.classification import accuracy, f1, precision, recall
from jaxopt_lab.metrics.ranking import roc_auc
from jaxopt_lab.metrics.regression import mae, mape, pearson, rmse

__all__ = (
    "accuracy",
    "f1",
    "mae",
    "mape",
    "pearson",
    "precision",
    "recall",
    "rmse",
    "roc_auc",
)
