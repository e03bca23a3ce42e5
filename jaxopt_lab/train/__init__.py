"""Train and eval steps, regularisers, early stopping, checkpoints and resumable
training, multi-process data parallelism, and the :class:`Dataset` they consume.

The bundled data and reference models moved to :mod:`jaxopt_lab.app` (the main job);
``jaxopt_lab.train.TeacherCNN`` and the other old names still resolve there, with a
``DeprecationWarning``, for one release.
"""

from jaxopt_lab.train import data
from jaxopt_lab.train import distributed
from jaxopt_lab.train.checkpoint import Checkpointer, DataPosition
from jaxopt_lab.train.distill_step import (
    FeatureHint,
    HintedParams,
    create_distill_state,
    kd_loss,
    make_distill_step,
    student_variables,
    teacher_outputs,
)
from jaxopt_lab.train.data import Dataset, Split, batches, make_dataset
from jaxopt_lab.train.distributed import distributed_train_step, global_mesh, process_rows
from jaxopt_lab.train.loop import (
    EarlyStoppingState,
    early_stopping_init,
    early_stopping_update,
    evaluate,
    fit,
    predict,
    train_loop,
)
from jaxopt_lab.train.regularize import add_l1, add_l2
from jaxopt_lab.train.resumable import batches_from, train_resumable
from jaxopt_lab.train.step import (
    TrainState,
    create_train_state,
    cross_entropy,
    data_mesh,
    jit_train_step,
    make_train_step,
    mesh_train_step,
    model_objective,
    pmap_train_step,
    replicate,
    shard_batch_for_pmap,
    unreplicate,
)

__all__ = (
    "FeatureHint",
    "HintedParams",
    "create_distill_state",
    "kd_loss",
    "make_distill_step",
    "student_variables",
    "teacher_outputs",
    "Checkpointer",
    "DataPosition",
    "Dataset",
    "EarlyStoppingState",
    "Split",
    "TrainState",
    "add_l1",
    "add_l2",
    "batches",
    "batches_from",
    "create_train_state",
    "cross_entropy",
    "data",
    "data_mesh",
    "distributed",
    "distributed_train_step",
    "early_stopping_init",
    "early_stopping_update",
    "evaluate",
    "fit",
    "global_mesh",
    "jit_train_step",
    "make_dataset",
    "make_train_step",
    "mesh_train_step",
    "model_objective",
    "pmap_train_step",
    "predict",
    "process_rows",
    "replicate",
    "shard_batch_for_pmap",
    "train_loop",
    "train_resumable",
    "unreplicate",
)


# Moved to the app layer (one-release aliases): resolved on access, so the library never
# imports the app.
_MOVED = {"MLP": "models", "NNXMLP": "models", "StudentCNN": "models", "TeacherCNN": "models",
          "init_model": "models", "param_count": "models", "models": None,
          "load_digits": "datasets", "load_npz": "datasets"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    module = _MOVED[name]
    new = f"jaxopt_lab.app.{module}.{name}" if module else f"jaxopt_lab.app.{name}"
    warnings.warn(f"jaxopt_lab.train.{name} moved to {new}", DeprecationWarning, stacklevel=2)
    value = importlib.import_module(f"jaxopt_lab.app.{module or name}")
    return getattr(value, name) if module else value
