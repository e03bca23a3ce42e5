"""Knowledge distillation: Hinton logit loss, feature hints (FitNets) and the KD train step."""

from jaxopt_lab.distill.features import capture_features, init_projection, layer_names, project
from jaxopt_lab.distill.losses import distill_loss, feature_distill_loss
from jaxopt_lab.distill.step import (
    FeatureHint,
    HintedParams,
    create_distill_state,
    kd_loss,
    make_distill_step,
    student_variables,
    teacher_outputs,
)

__all__ = (
    "FeatureHint",
    "HintedParams",
    "capture_features",
    "create_distill_state",
    "distill_loss",
    "feature_distill_loss",
    "init_projection",
    "kd_loss",
    "layer_names",
    "make_distill_step",
    "project",
    "student_variables",
    "teacher_outputs",
)
