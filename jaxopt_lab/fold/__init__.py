"""Batch-norm folding: fold BatchNorms into the Conv/Dense layers that feed them.

``bn_fold`` (linen) and ``bn_fold_nnx`` (NNX) fold; ``bn_fold_report`` says what would be
folded; ``folded_apply`` runs a folded linen model with the identity BatchNorms skipped, and
``bn_fold_nnx(..., remove_batchnorms=True)`` swaps them for ``FoldedBatchNorm`` stand-ins.
"""

from jaxopt_lab.fold.linen import bn_fold, bn_fold_report
from jaxopt_lab.fold.nnx import FoldedBatchNorm, bn_fold_nnx
from jaxopt_lab.fold.report import FoldedPair, FoldReport, SkippedBatchNorm
from jaxopt_lab.fold.runner import folded_apply

__all__ = (
    "FoldReport",
    "FoldedBatchNorm",
    "FoldedPair",
    "SkippedBatchNorm",
    "bn_fold",
    "bn_fold_nnx",
    "bn_fold_report",
    "folded_apply",
)
