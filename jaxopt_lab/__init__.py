"""jaxopt_lab: make trained JAX models smaller, faster and cheaper.

Pure-function transforms on parameter pytrees (quantize, prune, distill, fold batch
norm) that compose with each other and with optax. See README.md and docs/design.md.

Every public name loads on first use (PEP 562 module ``__getattr__``): ``import
jaxopt_lab`` does not import JAX, so the command line's ``--help`` answers at once, and
a notebook pays for JAX, Flax and the kernels only when it first uses them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> (module, attribute in it, or None for the module itself). Each area keeps its
# re-exports in its own block.
_LAZY: dict[str, tuple[str, str | None]] = {}


def _export(module: str, *names: str) -> None:
    for name in names:
        _LAZY[name] = (module, name)


def _module(name: str, module: str) -> None:
    _LAZY[name] = (module, None)


# --- training and data ---
_module("metrics", "jaxopt_lab.metrics")
# --- end training and data ---

# --- model-aware core ---
_module("core", "jaxopt_lab.core")
_export("jaxopt_lab.core", "LeafInfo", "ModelMap", "model_map")
# --- end model-aware core ---

# --- quantization ---
_module("io", "jaxopt_lab.io")
_module("quant", "jaxopt_lab.quant")
_export("jaxopt_lab.io", "load", "load_metadata", "save", "tree_nbytes")
_export("jaxopt_lab.io_sharded", "load_sharded", "save_sharded")
_export("jaxopt_lab.quant.core", "LayoutFallbackWarning", "dequantize", "quantize")
_export("jaxopt_lab.quant.fake_quant", "fake_quant", "lsq_fake_quant", "lsq_init")
_export("jaxopt_lab.quant.qtensor", "QTensor")
_export("jaxopt_lab.quant.settings", "LSQSettings", "QuantSettings")
_export("jaxopt_lab.quant.calibration", "CalibrationState", "calibration_init",
        "calibration_observe", "calibration_range", "calibration_scale")
_export("jaxopt_lab.quant.int8_ops", "int8_conv_general_dilated", "int8_dot_general",
        "int8_einsum", "quantize_activations", "weight_only_dot_general")
_export("jaxopt_lab.quant.interceptor", "quantized_apply")
_export("jaxopt_lab.quant.native", "float_int8_matmul", "int8_matmul", "use_native_int8")
_export("jaxopt_lab.quant.weight_only", "weight_only_matmul")
_export("jaxopt_lab.quant.model_calibration", "activation_scales", "activation_stats_init",
        "calibrate", "observe_activations")
# --- end quantization ---

# --- pruning ---
_module("pruning", "jaxopt_lab.pruning")
_export("jaxopt_lab.pruning", "CompactedLayer", "CompactReport", "NMSettings", "PruneState",
        "SkippedLayer", "SparseTensor", "Sparsity", "SparsitySettings", "apply_mask",
        "channel_mask", "compact", "compact_report", "constant_schedule", "constant_sparsity",
        "expand_channel_mask", "magnitude_mask", "nm_mask", "one_shot_schedule",
        "one_shot_sparsity", "polynomial_schedule", "polynomial_sparsity", "prune", "random_mask", "saliency_mask", "sparsity", "to_dense",
        "to_sparse")
# --- end pruning ---

# --- one-shot compression ---
_module("oneshot", "jaxopt_lab.oneshot")
_export("jaxopt_lab.oneshot", "GPTQSettings", "SparseGPTSettings", "WandaSettings")
# --- end one-shot compression ---

# --- distillation ---
_module("distill", "jaxopt_lab.distill")
_export("jaxopt_lab.distill", "distill_loss", "feature_distill_loss")
# --- end distillation ---

# --- folding ---
_module("fold", "jaxopt_lab.fold")
_export("jaxopt_lab.fold", "FoldedPair", "FoldReport", "SkippedBatchNorm", "bn_fold",
        "bn_fold_nnx", "bn_fold_report", "folded_apply")
# --- end folding ---

# --- main job ---
# Above the library: training helpers and the app (data, reference models, sweep, report).
_module("train", "jaxopt_lab.train")
_module("app", "jaxopt_lab.app")
# Moved to the app in this release: one-release aliases that warn (not in __all__).
_MOVED = {"report": ("jaxopt_lab.app.report", None), "sweep": ("jaxopt_lab.app.sweeps", "sweep")}
# --- end main job ---
# --- end main job ---

__all__ = tuple(sorted(_LAZY, key=str.lower))


def __getattr__(name: str):
    if name in _MOVED:
        import warnings

        module, attr = _MOVED[name]
        warnings.warn(f"jaxopt_lab.{name} moved to {module}{'.' + attr if attr else ''}",
                      DeprecationWarning, stacklevel=2)
        value = importlib.import_module(module)
        return getattr(value, attr) if attr else value
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'jaxopt_lab' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
