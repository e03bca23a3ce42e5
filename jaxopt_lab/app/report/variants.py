"""One small function per variant, each built only from jaxopt_lab's public API.

A :class:`Variant` is what the job measures: the model, the tree ``jol.save`` writes
(``stored``: `QTensor` s, sparse, folded or compacted variables...), how that tree becomes
float variables for ``jol.train.evaluate``, what is done once when it is loaded
(``prepare``: sparse storage is expanded, integer weights stay integer) and how it runs
at inference (``infer``, timed for the latency figures). Accuracy, sizes and latency are
all measured on the tree read back from the saved file, so the report describes what a
user would deploy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab.app.report import models
from jaxopt_lab.app.report.context import JobContext
from jaxopt_lab.app.report.training import fit_each, run_once

Variables = Any
Tree = Any


class Variant(NamedTuple):
    """One optimised model, ready to be saved and measured.

    Attributes:
      name: short identifier (a column of the report).
      description: one line saying how it was made.
      model: the linen module that runs it.
      stored: the tree written with ``jol.save`` (what is deployed).
      to_variables: ``stored -> float variables`` for ``jol.train.evaluate``.
      infer: pure ``(prepared, x) -> logits``, the deployed inference path (timed).
      prepare: ``stored -> prepared``, done once at load time (not timed).
      sparsity_target: the pruning target, for variants that prune.
      extra: further figures for the report (e.g. sparsity before quantization).
    """

    name: str
    description: str
    model: nn.Module
    stored: Tree
    to_variables: Callable[[Tree], Variables]
    infer: Callable[[Tree, jax.Array], jax.Array]
    prepare: Callable[[Tree], Tree] = lambda stored: stored
    sparsity_target: float | None = None
    extra: dict | None = None


# --- inference paths (cached per model so variants sharing one compile once) ----------


@functools.cache
def float_infer(model: nn.Module) -> Callable:
    """``model.apply`` in inference mode."""
    return lambda variables, x: model.apply(variables, x, train=False)


@functools.cache
def dequant_infer(model: nn.Module) -> Callable:
    """Weight-only quantization: integer weights in memory, computed on by
    `quantized_apply(mode="weight_only")` (on CPU the native kernels read the codes of every
    Dense and plain Conv kernel; other leaves are dequantized inside the program)."""
    return lambda stored, x: jol.quantized_apply(model, stored, x, mode="weight_only",
                                                 train=False)


def _with_params(variables: Variables, params: Tree) -> Variables:
    return {**variables, "params": params}


def sparse_stored(variables: Variables) -> Variables:
    """Pruned kernels as ``jol.to_sparse`` storage (expanded at load time: there are no
    sparse kernels to run them); everything else as it is."""
    return _with_params(variables, jol.to_sparse(variables["params"]))


def folded_infer(model: nn.Module, report) -> Callable:
    """A folded model with its identity BatchNorms skipped (``jol.folded_apply``)."""
    return lambda variables, x: jol.folded_apply(model, variables, x, report=report,
                                                 train=False)


def kernel_where(condition: Callable[[tuple[int, ...]], Any]) -> Callable:
    """A ``where`` over float kernels (ndim >= 2) whose choice is ``condition(shape)``."""
    def where(path, leaf):
        del path
        dtype = getattr(leaf, "dtype", None)  # leaves may be tracers (QAT inside jit)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            return False
        return condition(np.shape(leaf)) if np.ndim(leaf) >= 2 else False

    return where


# --- the variants ----------------------------------------------------------------------


def baseline(ctx: JobContext) -> Variant:
    teacher = ctx.models.teacher
    return Variant("baseline", "fp32 teacher, as trained", teacher, ctx.teacher_variables,
                   lambda v: v, float_infer(teacher))


def bn_folded(ctx: JobContext) -> Variant:
    teacher = ctx.models.teacher
    folded, report = jol.bn_fold(teacher, ctx.teacher_variables, ctx.x_example, train=False,
                                 return_report=True)
    return Variant("bn_folded", f"BatchNorm folded into {len(report.folded)} layers, "
                   "identity BNs skipped at inference", teacher, folded, lambda v: v,
                   folded_infer(teacher, report))


def _quantized(ctx: JobContext, name: str, description: str, variables: Variables,
               **settings) -> Variant:
    teacher = ctx.models.teacher
    stored = _with_params(variables, run_once(functools.partial(jol.quantize, **settings),
                                              variables["params"]))
    return Variant(name, description, teacher, stored, jol.dequantize, dequant_infer(teacher))


def int8_ptq(ctx: JobContext) -> Variant:
    return _quantized(ctx, "int8_ptq", "post-training int8, per output channel",
                      ctx.teacher_variables, bits=8, granularity="channel")


def int4_settings(ctx: JobContext) -> dict:
    """int4 with one scale per ``group_size`` inputs; per channel where groups don't fit."""
    g = ctx.settings.group_size
    where = kernel_where(lambda shape: True if shape[-2] % g == 0 else {"granularity": "channel"})
    return dict(bits=4, granularity="group", group_size=g, where=where)


def int4_group_ptq(ctx: JobContext) -> Variant:
    g = ctx.settings.group_size
    return _quantized(ctx, "int4_group_ptq", f"post-training int4, one scale per {g} inputs",
                      ctx.teacher_variables, **int4_settings(ctx))


def int4_qat(ctx: JobContext) -> Variant:
    s, settings = ctx.settings, int4_settings(ctx)
    tuned = ctx.fit(ctx.models.teacher, optax.adam(s.finetune_learning_rate),
                    epochs=s.finetune_epochs, variables=ctx.teacher_variables,
                    param_transform=lambda p: jol.fake_quant(p, **settings))
    return _quantized(ctx, "int4_qat", f"int4 per-group, {s.finetune_epochs} epoch(s) of "
                      "quantization-aware fine-tuning (fake_quant + STE)", tuned, **settings)


def gradual_schedule(ctx: JobContext, target: float, epochs: int):
    """Zhu & Gupta from 0 to ``target`` over the first half of ``epochs`` (in ten steps);
    the second half recovers at the target."""
    end = max(1, ctx.steps_per_epoch() * epochs // 2)
    return jol.polynomial_sparsity(0.0, target, 0, end, frequency=max(1, end // 10))


def gradual_prune(ctx: JobContext, model, variables: Variables, target: float, *,
                  epochs: int, loss=None) -> Variables:
    """Fine-tunes with gradual magnitude pruning to ``target`` (:func:`gradual_schedule`)."""
    tx = optax.chain(optax.adam(ctx.settings.finetune_learning_rate),
                     jol.prune(jol.magnitude_mask, gradual_schedule(ctx, target, epochs)))
    return ctx.fit(model, tx, epochs=epochs, variables=variables, loss=loss, keep_last=True)


MAGNITUDE_TARGETS = (0.5, 0.9)


def magnitude_pruned(ctx: JobContext) -> dict[float, Variables]:
    """The teacher fine-tuned with gradual magnitude pruning to 50% and to 90%.

    Both runs share one compiled train step: the final sparsity is an argument, scaling
    the schedule from 0 to 1 (Zhu & Gupta from 0 is linear in the final sparsity).
    """
    s = ctx.settings
    unit = gradual_schedule(ctx, 1.0, s.prune_epochs)

    def make_tx(target):
        return optax.chain(optax.adam(s.finetune_learning_rate),
                           jol.prune(jol.magnitude_mask, lambda t: target * unit(t)))

    return ctx.shared("magnitude_pruned", lambda: dict(zip(MAGNITUDE_TARGETS, fit_each(
        ctx.models.teacher, ctx.data, make_tx, MAGNITUDE_TARGETS, epochs=s.prune_epochs,
        batch_size=s.batch_size, seed=s.seed, variables=ctx.teacher_variables,
        devices=s.devices))))


def _pruned(ctx: JobContext, target: float) -> Variant:
    tuned = magnitude_pruned(ctx)[target]
    teacher = ctx.models.teacher
    pct = round(100 * target)
    return Variant(f"prune{pct}_gradual", f"{pct}% magnitude pruning, polynomial schedule "
                   f"over {ctx.settings.prune_epochs} fine-tuning epoch(s), sparse storage",
                   teacher, sparse_stored(tuned), jol.to_dense, float_infer(teacher),
                   prepare=jol.to_dense, sparsity_target=target)


def prune50_gradual(ctx: JobContext) -> Variant:
    return _pruned(ctx, 0.5)


def prune90_gradual(ctx: JobContext) -> Variant:
    return _pruned(ctx, 0.9)


def nm24(ctx: JobContext) -> Variant:
    s, teacher = ctx.settings, ctx.models.teacher
    where = kernel_where(lambda shape: shape[-2] % 4 == 0)
    tx = optax.chain(optax.adam(s.finetune_learning_rate),
                     jol.prune(functools.partial(jol.nm_mask, n=2, m=4), where=where))
    tuned = ctx.fit(teacher, tx, epochs=s.finetune_epochs, variables=ctx.teacher_variables,
                    keep_last=True)
    return Variant("nm24", "2:4 sparsity along the inputs (kernels with a multiple of 4 "
                   "inputs), fine-tuned, sparse storage", teacher, sparse_stored(tuned),
                   jol.to_dense, float_infer(teacher), prepare=jol.to_dense)


def kd_loss(ctx: JobContext):
    """Hinton distillation from the trained teacher, with the job's T and alpha."""
    s = ctx.settings
    return jol.train.kd_loss(ctx.models.teacher, ctx.teacher_variables,
                               temperature=s.temperature, alpha=s.alpha)


def student_variables(ctx: JobContext) -> Variables:
    """The distilled student (trained once, shared with the composed pipeline)."""
    s = ctx.settings
    return ctx.shared("student_kd", lambda: ctx.fit(
        ctx.models.student, optax.adam(s.learning_rate), epochs=s.student_epochs,
        loss=kd_loss(ctx), patience=s.patience))


def student_kd(ctx: JobContext) -> Variant:
    s, student = ctx.settings, ctx.models.student
    return Variant("student_kd", f"student distilled from the teacher (T={s.temperature}, "
                   f"alpha={s.alpha})", student, student_variables(ctx), lambda v: v,
                   float_infer(student))


def channel_compact(ctx: JobContext, target: float = 0.5) -> Variant:
    """Prunes whole output channels gradually, then removes them: a smaller dense model."""
    s, teacher, head = ctx.settings, ctx.models.teacher, ctx.models.teacher_head
    where = lambda path, leaf: (np.ndim(leaf) >= 2  # noqa: E731
                                and jax.tree_util.keystr(path[:1]) != f"['{head}']")
    schedule = gradual_schedule(ctx, target, s.finetune_epochs)
    tx = optax.chain(optax.adam(s.finetune_learning_rate),
                     jol.prune(jol.channel_mask, schedule, where=where))
    tuned = ctx.fit(teacher, tx, epochs=s.finetune_epochs, variables=ctx.teacher_variables,
                    keep_last=True)
    mask = jol.channel_mask(tuned["params"], target, where=where)
    resize = models.resize if ctx.models.kind == "dense" else None
    small, small_vars = jol.compact(teacher, tuned, mask, ctx.x_example, resize=resize,
                                    train=False)
    small_vars = jax.tree.map(np.asarray, small_vars)
    return Variant("channel_compact", f"{round(100 * target)}% of hidden channels pruned "
                   "gradually, then removed (smaller dense model)", small, small_vars,
                   lambda v: v, float_infer(small))
