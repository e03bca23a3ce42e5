"""Knowledge distillation: Hinton logit loss and feature hints (FitNets).

The distillation train step lives with the other train steps, in `jaxopt_lab.train`
(``make_distill_step`` and friends); the names below it used to have here still resolve
(deprecated, for one release).
"""

from jaxopt_lab.distill.features import capture_features, init_projection, layer_names, project
from jaxopt_lab.distill.losses import distill_loss, feature_distill_loss

_MOVED_TO_TRAIN = ("FeatureHint", "HintedParams", "create_distill_state", "kd_loss",
                   "make_distill_step", "student_variables", "teacher_outputs")


def __getattr__(name: str):
    if name in _MOVED_TO_TRAIN:
        import warnings

        from jaxopt_lab.train import distill_step
        warnings.warn(f"jaxopt_lab.distill.{name} moved to jaxopt_lab.train.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(distill_step, name)
    raise AttributeError(f"module 'jaxopt_lab.distill' has no attribute {name!r}")


__all__ = (
    "capture_features",
    "distill_loss",
    "feature_distill_loss",
    "init_projection",
    "layer_names",
    "project",
)
