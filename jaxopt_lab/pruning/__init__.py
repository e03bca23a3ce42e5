"""Pruning: exact mask functions, sparsity schedules, the ``prune`` optax transformation,
channel compaction and sparse storage."""

from jaxopt_lab.pruning.compaction import (
    CompactedLayer,
    CompactReport,
    SkippedLayer,
    compact,
    compact_report,
    expand_channel_mask,
)
from jaxopt_lab.pruning.masks import magnitude_mask, random_mask, saliency_mask
from jaxopt_lab.pruning.schedules import (
    constant_schedule,
    constant_sparsity,
    one_shot_schedule,
    one_shot_sparsity,
    polynomial_schedule,
    polynomial_sparsity,
)
from jaxopt_lab.pruning.settings import NMSettings, SparsitySettings
from jaxopt_lab.pruning.sparse import SparseTensor, to_dense, to_sparse
from jaxopt_lab.pruning.structured import channel_mask, nm_mask
from jaxopt_lab.pruning.transform import PruneState, Sparsity, apply_mask, prune, sparsity

__all__ = (
    "CompactReport",
    "CompactedLayer",
    "NMSettings",
    "SkippedLayer",
    "compact_report",
    "PruneState",
    "SparseTensor",
    "SparsitySettings",
    "Sparsity",
    "apply_mask",
    "channel_mask",
    "compact",
    "constant_schedule",
    "constant_sparsity",
    "expand_channel_mask",
    "magnitude_mask",
    "nm_mask",
    "one_shot_schedule",
    "one_shot_sparsity",
    "polynomial_schedule",
    "polynomial_sparsity",
    "prune",
    "random_mask",
    "saliency_mask",
    "sparsity",
    "to_dense",
    "to_sparse",
)
