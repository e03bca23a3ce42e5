"""Data, reference models, train and eval steps, regularisers, early stopping,
checkpoints and resumable training, multi-process data parallelism."""

from jaxopt_lab.train import data
from jaxopt_lab.train import distributed
from jaxopt_lab.train import models
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
from jaxopt_lab.train.data import Dataset, Split, batches, load_digits, load_npz, make_dataset
from jaxopt_lab.train.distributed import distributed_train_step, global_mesh, process_rows
from jaxopt_lab.train.loop import (
    EarlyStoppingState,
    early_stopping_init,
    early_stopping_update,
    evaluate,
    fit,
    predict,
)
from jaxopt_lab.train.models import MLP, NNXMLP, StudentCNN, TeacherCNN, init_model, param_count
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
    "MLP",
    "NNXMLP",
    "Checkpointer",
    "DataPosition",
    "Dataset",
    "EarlyStoppingState",
    "Split",
    "StudentCNN",
    "TeacherCNN",
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
    "init_model",
    "jit_train_step",
    "load_digits",
    "load_npz",
    "make_dataset",
    "make_train_step",
    "mesh_train_step",
    "models",
    "param_count",
    "pmap_train_step",
    "predict",
    "process_rows",
    "replicate",
    "shard_batch_for_pmap",
    "train_resumable",
    "unreplicate",
)
