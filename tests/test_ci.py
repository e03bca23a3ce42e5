"""`.ci/run` tests every Python version pyproject.toml declares, and the README says so."""

from __future__ import annotations

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _declared_pythons() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
            if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}


def test_every_declared_python_has_a_ci_leg():
    declared = _declared_pythons()
    assert {"3.11", "3.12", "3.13"} <= declared
    legs = set(re.findall(r'new_venv "\$\(find_python (3\.\d+)\)"', (ROOT / ".ci/run").read_text()))
    assert legs == declared


def test_requires_python_matches_the_oldest_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = min(_declared_pythons(), key=lambda v: tuple(map(int, v.split("."))))
    assert project["requires-python"] == f">={oldest}"


def test_readme_names_every_declared_python():
    readme = (ROOT / "README.md").read_text()
    line = next(p for p in readme.split("\n\n") if p.startswith("Supported versions:"))
    assert all(v in line for v in _declared_pythons()), line
