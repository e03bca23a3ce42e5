"""Which teacher and student the main job trains, chosen from the shape of the inputs.

Images ``(N, H, W, C)`` (or ``(N, H, W)``, given a channel axis) get the reference
``TeacherCNN`` / ``StudentCNN``; anything else is flattened and gets a Dense -> BatchNorm
-> ReLU network, so every variant (BN folding, channel pruning...) means the same thing
on both kinds of data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import numpy as np

from jaxopt_lab.app import models


class DenseBNNet(nn.Module):
    """Dense -> BatchNorm -> ReLU blocks and a Dense head, on flattened inputs."""

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.Dense(h, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class ModelPair(NamedTuple):
    """The teacher (the baseline) and the smaller student of one data set."""

    teacher: nn.Module
    student: nn.Module
    kind: str  # "cnn" or "dense"
    teacher_head: str  # the output layer's module name: its channels are never pruned


def as_model_input(x: np.ndarray) -> np.ndarray:
    """Gives 3-D inputs ``(N, H, W)`` a channel axis; leaves everything else as it is."""
    return x[..., None] if x.ndim == 3 else x


def models_for(x: np.ndarray, num_classes: int) -> ModelPair:
    """Convolutional models for images at least 2x2, Dense ones for everything else."""
    if x.ndim == 4 and x.shape[1] >= 2 and x.shape[2] >= 2:
        return ModelPair(models.TeacherCNN(num_classes=num_classes),
                         models.StudentCNN(num_classes=num_classes), "cnn", "Dense_1")
    hidden = (256, 128)
    return ModelPair(DenseBNNet(hidden=hidden, num_classes=num_classes),
                     DenseBNNet(hidden=(32,), num_classes=num_classes), "dense",
                     f"Dense_{len(hidden)}")


def resize(model: nn.Module, widths: list[int]) -> nn.Module:
    """``jol.compact``'s resize rule for :class:`DenseBNNet` (the reference models have
    theirs built in)."""
    if not isinstance(model, DenseBNNet):
        raise TypeError(f"no resize rule for {type(model).__name__}")
    return model.clone(hidden=tuple(widths))
