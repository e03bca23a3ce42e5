"""The main job, above the library: bundled data, reference models, the sweep, the
report and the ``jaxopt-lab`` command line.

The app imports the library through its public names; nothing in the library imports
the app. It loads orbax, matplotlib, tqdm and scikit-learn as it needs them.
"""

from jaxopt_lab.app import datasets, models
from jaxopt_lab.app.datasets import load_digits, load_npz
from jaxopt_lab.app.models import (
    MLP,
    NNXMLP,
    StudentCNN,
    TeacherCNN,
    init_model,
    max_pool_2x2,
    param_count,
)
from jaxopt_lab.app.sweeps import format_table, sweep, sweep_student

__all__ = (
    "MLP",
    "NNXMLP",
    "StudentCNN",
    "TeacherCNN",
    "datasets",
    "format_table",
    "init_model",
    "load_digits",
    "load_npz",
    "max_pool_2x2",
    "models",
    "param_count",
    "sweep",
    "sweep_student",
)
