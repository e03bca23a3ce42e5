"""The package's layers, read from its import statements (a static scan, no import).

Library below, app above: ``core`` (model map, hook layer, selection, serialization,
metrics, ``QTensor``) < the techniques (quant, pruning, distill, fold, oneshot) <
``train`` < ``app``. A module may import its own layer or a lower one, at module level or
inside a function; no import runs back up, and the import graph has no cycle. The one
exception: a package's module-level ``__getattr__`` that resolves a name moved to a higher
layer (a one-release deprecation alias, which warns). The
package's ``__init__`` is the facade over all layers and is not checked here; its lazy
names are tested by importing them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "jaxopt_lab"

# The layer of each module, by the longest matching prefix.
LAYERS = {
    "jaxopt_lab.core": 0, "jaxopt_lab._select": 0, "jaxopt_lab._serial": 0,
    "jaxopt_lab._pow2": 0, "jaxopt_lab.io": 0, "jaxopt_lab.io_sharded": 0, "jaxopt_lab.metrics": 0,
    "jaxopt_lab.quant.qtensor": 0, "jaxopt_lab.quant.affine": 0,
    "jaxopt_lab.quant": 1, "jaxopt_lab.pruning": 1, "jaxopt_lab.distill": 1,
    "jaxopt_lab.fold": 1, "jaxopt_lab.oneshot": 1, "jaxopt_lab._conv_matmul": 1,
    "jaxopt_lab.train": 2,
    "jaxopt_lab.app": 3, "jaxopt_lab.__main__": 3,
}
NAMES = {0: "core", 1: "techniques", 2: "train", 3: "app"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(module: str) -> int:
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    assert keys, f"{module} has no layer: add it to LAYERS"
    return LAYERS[max(keys, key=len)]


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or the module defining a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported package module, line, at module level) for every import statement."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nested, aliases = set(), set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(fn)}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__":
            aliases |= {id(n) for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        else:
            continue
        if id(node) in aliases:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("jaxopt_lab") else None
            if target and target != module:
                out.append((target, node.lineno, id(node) not in nested))
    return out


LIBRARY = sorted(m for m in MODULES if m != "jaxopt_lab")


@pytest.mark.parametrize("module", LIBRARY)
def test_no_import_runs_back_up(module):
    for target, line, _ in imports(module):
        if target == "jaxopt_lab":
            # The app uses the library through its public names; inside the library the
            # facade would be an import of every layer.
            assert layer(module) == 3, (f"{module}:{line} imports the package facade; import "
                                        "the module that defines the name instead")
            continue
        assert layer(target) <= layer(module), (
            f"{module}:{line} ({NAMES[layer(module)]}) imports {target} "
            f"({NAMES[layer(target)]}), a higher layer")


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    # Every import statement counts, function-level ones included: a cycle hidden in a
    # function is still a cycle in the design. A package's __init__ re-exporting its own
    # modules is a parent edge, not a cycle.
    edges = {m: {t for t, _, _ in imports(m)
                 if not (t.startswith(m + ".") and MODULES[m].name == "__init__.py")}
             for m in LIBRARY}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_every_module_has_a_layer():
    for m in LIBRARY:
        layer(m)


def test_import_jaxopt_lab_stays_light():
    code = ("import sys, jaxopt_lab\n"
            "print(sorted(m for m in ('orbax', 'matplotlib', 'tqdm', 'sklearn', "
            "'jaxopt_lab.app', 'jaxopt_lab.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_helper_is_imported_from_another_module(module):
    """``from m import _helper`` across modules makes ``_helper`` public in all but name.

    A private *module* (``from jaxopt_lab.metrics import _checks``) is fine: its public
    names are its interface within the package.
    """
    tree = ast.parse(MODULES[module].read_text())
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("jaxopt_lab")):
            continue
        for alias in node.names:
            name = alias.name
            if (name.startswith("_") and not name.startswith("__")
                    and f"{node.module}.{name}" not in MODULES):
                bad.append(f"line {node.lineno}: from {node.module} import {name}")
    assert not bad, f"{module} imports private helpers: {bad}"
