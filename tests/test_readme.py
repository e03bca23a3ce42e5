"""The README's Python blocks run as written (training shortened to one epoch each)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "dist.initialize" in code or "process_id" in code:
        pytest.skip("multi-process example: run by tests/test_train_distributed.py's workers")
    monkeypatch.chdir(tmp_path)
    # Epoch counts only change how long it trains: one epoch keeps CI short.
    code = re.sub(r"epochs=\d+", "epochs=1", code)
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_has_the_model_map_blocks():
    assert len(BLOCKS) >= 2 and "jol.model_map" in BLOCKS[0] and "nnx" in BLOCKS[1]
