"""The main job, above the library: bundled data, reference models, the sweep, the
report and the ``jaxopt-lab`` command line.

The app imports the library through its public names; nothing in the library imports
the app. Its names load on first use, so that ``jaxopt-lab --help`` (which imports
``jaxopt_lab.app.cli``) never waits for JAX, orbax, matplotlib or scikit-learn.
"""

import importlib

_NAMES = {
    "MLP": "models",
    "NNXMLP": "models",
    "StudentCNN": "models",
    "TeacherCNN": "models",
    "init_model": "models",
    "max_pool_2x2": "models",
    "param_count": "models",
    "load_digits": "datasets",
    "load_npz": "datasets",
    "format_table": "sweeps",
    "sweep": "sweeps",
    "sweep_student": "sweeps",
}
_MODULES = ("cli", "datasets", "models", "report", "sweeps")

__all__ = tuple(sorted((*_NAMES, *_MODULES)))


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted((*globals(), *__all__))
