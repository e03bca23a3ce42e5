"""Data, reference models, train and eval steps, regularisers, early stopping."""

from jaxopt_lab.train import data
from jaxopt_lab.train import models
from jaxopt_lab.train.data import Dataset, Split, batches, load_digits, load_npz, make_dataset
from jaxopt_lab.train.models import MLP, NNXMLP, StudentCNN, TeacherCNN, param_count

__all__ = (
    "MLP",
    "NNXMLP",
    "Dataset",
    "Split",
    "StudentCNN",
    "TeacherCNN",
    "batches",
    "data",
    "load_digits",
    "load_npz",
    "make_dataset",
    "models",
    "param_count",
)
