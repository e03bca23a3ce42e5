"""The main job's settings: one frozen record, with a default and a ``--quick`` preset."""

from __future__ import annotations

import dataclasses
import os

# What ``--data`` must hold; every message about an unusable data file repeats it.
NPZ_LAYOUT = ("an .npz file (numpy.savez) holding two arrays: x, the examples along the first "
              "axis (images as (N, H, W) or (N, H, W, C), or feature rows (N, F)), and y, "
              "N integer class labels 0..K-1 with at least 2 classes")

# Every variant the job can build, in report order; "baseline" is always built.
VARIANTS = (
    "baseline",
    "bn_folded",
    "int8_ptq",
    "int4_group_ptq",
    "int4_qat",
    "prune50_gradual",
    "prune90_gradual",
    "nm24",
    "channel_compact",
    "student_kd",
    "pipeline",
)


# The technique family of each variant: one colour per family in the report's plots.
FAMILIES = {
    "baseline": "baseline",
    "bn_folded": "folding",
    "int8_ptq": "quantization",
    "int4_group_ptq": "quantization",
    "int4_qat": "quantization",
    "prune50_gradual": "pruning",
    "prune90_gradual": "pruning",
    "nm24": "pruning",
    "channel_compact": "pruning",
    "student_kd": "distillation",
    "pipeline": "composed",
}
assert tuple(FAMILIES) == VARIANTS


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """How much work the main job does; everything else follows from the seed.

    Attributes:
      seed: initialisation, shuffling and split seed; same seed, same figures.
      quick: the small preset (whole job well under a minute on a 2-core CPU).
      teacher_epochs: maximum epochs of the baseline teacher (early-stopped).
      finetune_epochs: epochs of each fine-tune (QAT, 2:4, channel pruning).
      prune_epochs: epochs of the gradual magnitude-pruning fine-tunes (50% and 90%):
        the ramp takes the first half, the second half recovers at the target.
      student_epochs: maximum epochs of the distilled student.
      pipeline_epochs: epochs of each fine-tuning stage of the composed pipeline.
      patience: early-stopping patience of the from-scratch runs.
      batch_size: global training batch (rounded up to a multiple of ``devices``).
      learning_rate: Adam learning rate of the from-scratch runs.
      finetune_learning_rate: Adam learning rate of the fine-tunes.
      temperature: distillation temperature.
      alpha: weight of the soft-target term of the distillation loss.
      pipeline_sparsity: the pruning target of the composed pipeline.
      group_size: elements sharing one scale in int4 per-group quantization.
      latency_repeats: timed runs per latency figure (the median is reported).
      devices: train data-parallel over this many devices (None: one device, no mesh).
      workers: variants built at once in threads (None: one per CPU core, at most 4; 1
        with ``devices``). Building is mostly XLA compilation, which runs in parallel;
        measuring is always done one variant at a time.
      progress: show progress bars.
    """

    seed: int = 0
    quick: bool = False
    teacher_epochs: int = 15
    finetune_epochs: int = 5
    prune_epochs: int = 16
    student_epochs: int = 20
    pipeline_epochs: int = 4
    patience: int | None = 4
    batch_size: int = 64
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 5e-4
    temperature: float = 4.0
    alpha: float = 0.9
    pipeline_sparsity: float = 0.5
    group_size: int = 16
    latency_repeats: int = 30
    devices: int | None = None
    workers: int | None = None
    progress: bool = True

    def build_workers(self) -> int:
        """How many variants to build at once."""
        if self.workers is not None:
            return max(1, self.workers)
        if self.devices is not None:
            return 1  # multi-device programs are not run concurrently
        return max(1, min(4, os.cpu_count() or 1))

    @classmethod
    def preset(cls, *, quick: bool = False, **overrides) -> JobSettings:
        """The default settings, or the ``--quick`` ones, with ``overrides`` applied."""
        if quick:
            base = dict(quick=True, teacher_epochs=4, finetune_epochs=3, prune_epochs=3,
                        student_epochs=6, pipeline_epochs=2, patience=None, latency_repeats=7)
        else:
            base = {}
        return cls(**{**base, **overrides})
