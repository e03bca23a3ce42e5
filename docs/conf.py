"""Sphinx configuration: the API reference, generated from the docstrings.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install
".[docs]"``). Every public module of the package is found by ``autosummary``'s recursive
walk, so modules added later appear without editing this folder.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "jaxopt_lab"
author = "jaxopt_lab contributors"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autosummary_imported_members = False  # each object is documented where it is defined
# Members defined in each module only (a package's ``__all__`` re-exports would document
# every object twice); attributes listed in docstrings render as fields, not entries.
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True,
                           "ignore-module-all": True}
napoleon_use_ivar = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
templates_path = ["_templates"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = []


def _split_star_args(app, what, name, obj, options, lines):
    """Google style lets ``*args, **kwargs: text`` share one entry; napoleon reads that as
    one malformed name, so it becomes two entries before napoleon runs."""
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("*args, **kwargs:"):
            indent = line[: len(line) - len(stripped)]
            text = stripped[len("*args, **kwargs:"):]
            lines[i] = f"{indent}*args:{text}"
            lines.insert(i + 1, f"{indent}**kwargs: see ``*args``.")


def setup(app):
    app.connect("autodoc-process-docstring", _split_star_args, priority=100)
