"""The composed pipeline: distill -> gradual prune -> QAT int8 -> fold -> quantize -> save.

Each stage is one public jaxopt_lab piece, and the stages compose because of two exact
properties: ``jol.prune`` keeps pruned weights at exactly 0.0 while later stages train
(here with the pruned pattern as a fixed mask), and symmetric quantization maps 0.0 to
the integer code 0. Folding multiplies each output channel by one number, which keeps
zeros zero and, with one scale per output channel, leaves the QAT-trained integer grid
unchanged. So the sparsity reached by pruning is exactly the sparsity of the int8 codes
written to disk, which are stored sparsely (bitmask + nonzero codes).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab.app.report.context import JobContext
from jaxopt_lab.app.report.variants import Variant, gradual_prune, kd_loss, student_variables

Tree = Any
QAT_SETTINGS = dict(bits=8, granularity="channel")


def kept_mask(params: Tree) -> Tree:
    """True where a kernel weight is nonzero (biases and norms always kept)."""
    return jax.tree.map(lambda p: np.asarray(p) != 0 if np.ndim(p) >= 2 else
                        np.ones(np.shape(p), bool), params)


def _int8_kernel_codes(path, leaf) -> bool:
    del path
    return np.dtype(leaf.dtype) == np.int8 and np.ndim(leaf) >= 2


def to_storage(float_tree: Tree) -> Tree:
    """Symmetric per-channel int8 kernels, their codes stored sparsely."""
    quantized = jol.quantize(float_tree, **QAT_SETTINGS)
    return jol.to_sparse(quantized, where=_int8_kernel_codes)


def from_storage(stored: Tree) -> Tree:
    """The float variables the stored tree stands for."""
    return jol.dequantize(jol.to_dense(stored))


def pipeline(ctx: JobContext) -> Variant:
    """Builds the composed pipeline from the (shared) distilled student."""
    s, student = ctx.settings, ctx.models.student
    target = s.pipeline_sparsity
    loss = kd_loss(ctx)
    distilled = student_variables(ctx)
    pruned = gradual_prune(ctx, student, distilled, target, epochs=s.pipeline_epochs, loss=loss)
    tx = optax.chain(optax.adam(s.finetune_learning_rate), jol.prune(kept_mask(pruned["params"])))
    qat = ctx.fit(student, tx, epochs=s.pipeline_epochs, variables=pruned, loss=loss,
                  param_transform=lambda p: jol.fake_quant(p, **QAT_SETTINGS))
    folded, report = jol.bn_fold(student, qat, ctx.x_example, train=False, return_report=True)
    stored = {**folded, "params": to_storage(folded["params"])}

    def infer(codes, x):  # int8 codes in memory, expanded inside the program
        return jol.folded_apply(student, jol.dequantize(codes), x, report=report, train=False)

    before = float(jol.sparsity(folded["params"]).overall)
    return Variant(
        "pipeline",
        f"distill -> {round(100 * target)}% gradual prune -> int8 QAT -> BN fold -> int8 "
        "quantize (sparse codes) -> save",
        student, stored, from_storage, infer, prepare=jol.to_dense, sparsity_target=target,
        extra={"sparsity_before_quantization": before},
    )
