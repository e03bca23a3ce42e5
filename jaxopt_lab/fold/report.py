"""What a fold did: which layer/BatchNorm pairs were folded and which BatchNorms were not."""

from __future__ import annotations

import warnings
from typing import NamedTuple

TRAINING_MODE = "it runs in training mode"


class FoldedPair(NamedTuple):
    """A BatchNorm folded into the layer that feeds it.

    Attributes:
      layer: module path of the Conv/ConvTranspose/Dense/DenseGeneral (``"block1/Conv_0"``).
      batch_norm: module path of the BatchNorm, now an exact identity plus a shift.
      shift_in: where the shift lives: ``"layer_bias"`` (the BatchNorm is ``x -> x``),
        ``"bn_bias"`` (``x -> x + bias``) or ``"bn_mean"`` (``x -> x - mean``).
    """

    layer: str
    batch_norm: str
    shift_in: str


class SkippedBatchNorm(NamedTuple):
    """A BatchNorm left untouched, and why.

    Attributes:
      batch_norm: module path of the BatchNorm.
      layer: module path of the layer that feeds it, or ``None`` if no foldable layer does.
      reason: a human-readable explanation.
    """

    batch_norm: str
    layer: str | None
    reason: str


class FoldReport(NamedTuple):
    """Result of tracing a model for batch-norm folding.

    Attributes:
      folded: the pairs folded (or, from ``bn_fold_report``, the pairs that would be).
      skipped: every other BatchNorm seen during the trace, with the reason.
    """

    folded: tuple[FoldedPair, ...]
    skipped: tuple[SkippedBatchNorm, ...]

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s), skipped {len(self.skipped)}"]
        lines += [f"  folded  {p.batch_norm} into {p.layer} (shift in {p.shift_in})"
                  for p in self.folded]
        lines += [f"  skipped {s.batch_norm}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def warn_if_training(report: FoldReport) -> None:
    """Warns when BatchNorms were left because the trace ran them in training mode."""
    names = [s.batch_norm for s in report.skipped if s.reason.startswith(TRAINING_MODE)]
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        warnings.warn(
            f"bn_fold left {len(names)} BatchNorm(s) unfolded because they ran in training "
            f"mode ({shown}); pass the eval arguments, e.g. train=False",
            stacklevel=3,
        )
