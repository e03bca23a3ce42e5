"""One-shot compression of trained models from calibration data: GPTQ, AWQ, SmoothQuant,
Hadamard rotation, SparseGPT, Wanda, the block-by-block calibration driver, and the
per-layer sensitivity sweep with its mixed assignment under a budget."""

from jaxopt_lab.oneshot.awq import (
    AWQModelResult,
    AWQResult,
    awq,
    awq_matrix,
    fold_scale_into_dense,
    fold_scale_into_norm,
)
from jaxopt_lab.oneshot.calibration import calibration_stats
from jaxopt_lab.oneshot.gptq import gptq, gptq_matrix
from jaxopt_lab.oneshot.rotation import (
    fold_norm_scale,
    random_hadamard,
    rotate_readers,
    rotate_writers,
)
from jaxopt_lab.oneshot.sensitivity import Sensitivity, as_where, propose, sensitivity
from jaxopt_lab.oneshot.settings import GPTQSettings, SparseGPTSettings, WandaSettings
from jaxopt_lab.oneshot.sequential import block_stats, sequential
from jaxopt_lab.oneshot.smoothquant import smooth, smooth_layernorm, smooth_scales
from jaxopt_lab.oneshot.sparsegpt import sparsegpt, sparsegpt_matrix
from jaxopt_lab.oneshot.stats import LayerStats, hessian_accumulate, hessian_init
from jaxopt_lab.oneshot.wanda import wanda, wanda_matrix

__all__ = (
    "AWQModelResult",
    "AWQResult",
    "GPTQSettings",
    "LayerStats",
    "Sensitivity",
    "SparseGPTSettings",
    "WandaSettings",
    "as_where",
    "awq",
    "awq_matrix",
    "block_stats",
    "calibration_stats",
    "fold_norm_scale",
    "fold_scale_into_dense",
    "fold_scale_into_norm",
    "gptq",
    "gptq_matrix",
    "hessian_accumulate",
    "hessian_init",
    "propose",
    "random_hadamard",
    "rotate_readers",
    "rotate_writers",
    "sensitivity",
    "sequential",
    "smooth",
    "smooth_layernorm",
    "smooth_scales",
    "sparsegpt",
    "sparsegpt_matrix",
    "wanda",
    "wanda_matrix",
)
