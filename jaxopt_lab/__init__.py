"""jaxopt_lab: make trained JAX models smaller, faster and cheaper.

Pure-function transforms on parameter pytrees (quantize, prune, distill, fold batch
norm) that compose with each other and with optax. See README.md and docs/design.md.
"""

# Each area keeps its re-exports in its own block; edit only your block.
# --- training and data ---
from jaxopt_lab import metrics
# --- end training and data ---

# --- model-aware core ---
from jaxopt_lab import core
from jaxopt_lab.core import LeafInfo, ModelMap, model_map
# --- end model-aware core ---

# --- quantization ---
from jaxopt_lab import io
from jaxopt_lab import quant
from jaxopt_lab.io import load, load_metadata, save, tree_nbytes
from jaxopt_lab.quant.core import LayoutFallbackWarning, dequantize, quantize
from jaxopt_lab.quant.fake_quant import fake_quant, lsq_fake_quant, lsq_init
from jaxopt_lab.quant.qtensor import QTensor
from jaxopt_lab.quant.calibration import (
    CalibrationState,
    calibration_init,
    calibration_observe,
    calibration_range,
    calibration_scale,
)
from jaxopt_lab.quant.int8_ops import (
    int8_conv_general_dilated,
    int8_dot_general,
    int8_einsum,
    quantize_activations,
    weight_only_dot_general,
)
from jaxopt_lab.quant.interceptor import quantized_apply
from jaxopt_lab.quant.native import float_int8_matmul, int8_matmul, use_native_int8
from jaxopt_lab.quant.weight_only import weight_only_matmul
from jaxopt_lab.quant.model_calibration import (
    activation_scales,
    activation_stats_init,
    calibrate,
    observe_activations,
)
# --- end quantization ---

# --- pruning ---
from jaxopt_lab import pruning
from jaxopt_lab.pruning import (
    CompactedLayer,
    CompactReport,
    SkippedLayer,
    compact_report,
    PruneState,
    SparseTensor,
    Sparsity,
    apply_mask,
    channel_mask,
    compact,
    constant_schedule,
    constant_sparsity,
    expand_channel_mask,
    magnitude_mask,
    nm_mask,
    one_shot_schedule,
    one_shot_sparsity,
    polynomial_schedule,
    polynomial_sparsity,
    prune,
    random_mask,
    saliency_mask,
    sparsity,
    to_dense,
    to_sparse,
)
# --- end pruning ---

# --- one-shot compression ---
from jaxopt_lab import oneshot
# --- end one-shot compression ---

# --- distillation ---
from jaxopt_lab import distill
from jaxopt_lab.distill import distill_loss, feature_distill_loss
# --- end distillation ---

# --- folding ---
from jaxopt_lab import fold
from jaxopt_lab.fold import (
    FoldedPair,
    FoldReport,
    SkippedBatchNorm,
    bn_fold,
    bn_fold_nnx,
    bn_fold_report,
    folded_apply,
)
# --- end folding ---

# --- main job ---
# `train` and `app` load orbax, matplotlib, tqdm and scikit-learn: imported on first use, so
# `import jaxopt_lab` stays light. `sweep` and `report` moved to the app (one-release aliases).
_LAZY = {"train": ("jaxopt_lab.train", None), "app": ("jaxopt_lab.app", None)}
_MOVED = {"report": ("jaxopt_lab.app.report", None), "sweep": ("jaxopt_lab.app.sweeps", "sweep")}


def __getattr__(name: str):
    if name in _LAZY or name in _MOVED:
        import importlib
        module, attr = _LAZY.get(name) or _MOVED[name]
        if name in _MOVED:
            import warnings
            new = f"{module}.{attr}" if attr else module
            warnings.warn(f"jaxopt_lab.{name} moved to {new}", DeprecationWarning, stacklevel=2)
        value = importlib.import_module(module)
        value = getattr(value, attr) if attr else value
        if name in _LAZY:
            globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxopt_lab' has no attribute {name!r}")
# --- end main job ---

__version__ = "0.1.0"

__all__ = (
    "CompactReport",
    "CompactedLayer",
    "SkippedLayer",
    "compact_report",
    "CalibrationState",
    "FoldReport",
    "FoldedPair",
    "LayoutFallbackWarning",
    "LeafInfo",
    "ModelMap",
    "PruneState",
    "QTensor",
    "SkippedBatchNorm",
    "SparseTensor",
    "Sparsity",
    "activation_scales",
    "activation_stats_init",
    "app",
    "apply_mask",
    "bn_fold",
    "bn_fold_nnx",
    "bn_fold_report",
    "calibrate",
    "calibration_init",
    "calibration_observe",
    "calibration_range",
    "calibration_scale",
    "core",
    "channel_mask",
    "compact",
    "constant_schedule",
    "constant_sparsity",
    "dequantize",
    "distill",
    "distill_loss",
    "expand_channel_mask",
    "fake_quant",
    "feature_distill_loss",
    "float_int8_matmul",
    "fold",
    "folded_apply",
    "int8_conv_general_dilated",
    "int8_dot_general",
    "int8_einsum",
    "int8_matmul",
    "io",
    "load",
    "load_metadata",
    "lsq_fake_quant",
    "lsq_init",
    "magnitude_mask",
    "metrics",
    "model_map",
    "nm_mask",
    "observe_activations",
    "oneshot",
    "one_shot_schedule",
    "one_shot_sparsity",
    "polynomial_schedule",
    "polynomial_sparsity",
    "prune",
    "pruning",
    "quant",
    "quantize",
    "quantize_activations",
    "quantized_apply",
    "random_mask",
    "saliency_mask",
    "save",
    "sparsity",
    "to_dense",
    "to_sparse",
    "train",
    "tree_nbytes",
    "use_native_int8",
    "weight_only_dot_general",
    "weight_only_matmul",
)
