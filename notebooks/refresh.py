"""Re-executes the notebooks and saves them with their outputs (tables, plots).

Run from a checkout, with jaxopt_lab and the test extras installed:

    python notebooks/refresh.py                 # every notebook, full settings, saved
    python notebooks/refresh.py pruning         # just one
    python notebooks/refresh.py --quick --check # quick parameters, nothing saved

Each notebook runs top to bottom in a fresh kernel of this interpreter, in a temporary
working directory (the files it writes stay out of the checkout). ``--quick`` appends
``QUICK = True`` to the cell tagged ``parameters``, as papermill would; a saved notebook
always comes from a run with the parameters it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
KERNEL_NAME = "jaxopt-lab-notebooks"
CELL_TIMEOUT_S = 1800


def notebooks() -> list[pathlib.Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def kernel_env(root: pathlib.Path) -> dict[str, str]:
    """Variables for a hermetic kernel of this interpreter (a kernelspec written under
    ``root``, so a ``python3`` kernelspec pointing at another Python is never used)."""
    spec_dir = root / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxopt_lab", "language": "python"}))
    ipython = root / "ipython" / "profile_default"
    ipython.mkdir(parents=True, exist_ok=True)
    (ipython / "ipython_kernel_config.py").write_text('c.InteractiveShell.colors = "nocolor"\n')
    (root / "runtime").mkdir(exist_ok=True)
    # JAXOPT_LAB_CHECKOUT: where a notebook finds the checkout's benchmarks/ (one_shot reads
    # the real model through benchmarks/_minilm.py), since it runs in a temporary folder
    # and the package may be installed outside the checkout.
    return {"JUPYTER_PATH": str(root / "jupyter"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
            "IPYTHONDIR": str(root / "ipython"), "JAXOPT_LAB_CHECKOUT": str(NOTEBOOK_DIR.parent)}


def set_parameters(nb: nbformat.NotebookNode, source: str) -> None:
    """Appends ``source`` to the cell tagged ``parameters``."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(cells)}")
    cells[0].source += "\n" + source


def execute(path: pathlib.Path, *, quick: bool, workdir: pathlib.Path,
            timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Runs the notebook at ``path`` in ``workdir``; returns it with its outputs.

    Raises ``nbclient.exceptions.CellExecutionError`` (with the cell and its traceback)
    when a cell fails.
    """
    nb = nbformat.read(path, as_version=4)
    if quick:
        set_parameters(nb, "QUICK = True")
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=timeout, startup_timeout=120,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--quick", action="store_true", help="QUICK = True (implies --check)")
    parser.add_argument("--check", action="store_true", help="run only; save nothing")
    args = parser.parse_args(argv)
    paths = [p for p in notebooks() if not args.names or p.stem in args.names]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(kernel_env(pathlib.Path(tmp)))
        for path in paths:
            workdir = pathlib.Path(tmp) / path.stem
            workdir.mkdir()
            nb = execute(path, quick=args.quick, workdir=workdir)
            if not (args.check or args.quick):
                nbformat.write(nb, path)
            print(f"{path.name}: ran{'' if args.check or args.quick else ', saved'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
