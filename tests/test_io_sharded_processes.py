"""Sharded artifacts across processes: 2 JAX processes x 4 CPU devices (gloo on 127.0.0.1)
save a sharded tree with QTensors and a mask, load it back bit for bit, and one process
with 8 devices loads it onto another mesh; a save whose process is SIGKILLed before the
index is written leaves the previous artifact loadable and the partial one refused.

One two-process job (``tests/_mp_sharded_io_worker.py``, started by
``benchmarks/scale.py``'s launcher) does the saving; this process, whose 8 host devices
come from conftest.py, does the loading onto another mesh.
"""

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_mp_sharded_io_worker.py"
JOB_TIMEOUT_S = 240  # hard bound on the two-process job (about 10-30 s)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the job once: the saved artifact (a copy taken before the killed resave), the
    artifact directory after it, and each process's row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    work = tmp_path_factory.mktemp("two_processes")
    art = work / "art"
    rows = scale.launch([str(WORKER), str(art), "--seed", "0", "--killed-resave"], 2,
                        timeout=JOB_TIMEOUT_S)
    return art, rows


def _digests(tree):
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        out[jax.tree_util.keystr(path)] = hashlib.sha256(
            f"{x.dtype}{x.shape}".encode() + x.tobytes()).hexdigest()
    return out


def _saved(rows):
    """Each process's RESULT from the first (completed) save, failing readably if absent."""
    results = [r.get("result") if "error" in r else r for r in rows]
    if not all(results):
        pytest.fail("the two-process save failed:\n" + "\n".join(
            "".join(ln + "\n" for ln in r.get("error", "").splitlines()
                    if not ln.startswith("[Gloo]")) for r in rows))
    return results


def test_the_same_two_processes_load_their_artifact_back_bit_exactly(job):
    _, rows = job
    results = _saved(rows)
    for r in results:
        assert (r["devices"], r["local_devices"]) == (8, 4)
        assert r["same_process_load_exact"], r["process"]
        assert r["loaded_digests"] == r["digests"]
        assert r["metadata"] == {"seed": 0}
    assert results[0]["digests"] == results[1]["digests"]


def _another_mesh_spec(name, shape, dtype):
    """Every leaf onto a 2x4 mesh of the devices in reverse order, along other axes."""
    del name, dtype
    mesh = Mesh(np.array(jax.devices()[::-1]).reshape(2, 4), ("a", "b"))
    axes = [("b", 4), ("a", 2)]
    spec = []
    for n in shape:  # each mesh axis on the first dimension it divides
        pick = next((ax for ax, size in axes if n % size == 0), None)
        if pick is not None:
            axes = [(ax, size) for ax, size in axes if ax != pick]
        spec.append(pick)
    return NamedSharding(mesh, P(*spec))


def test_one_process_with_8_devices_loads_it_onto_another_mesh_bit_exactly(job):
    art, rows = job
    want = _saved(rows)[0]["digests"]
    back, meta = jol.load_sharded(art, shardings=_another_mesh_spec, with_metadata=True)
    assert meta == {"seed": 0}
    assert isinstance(back["q8"], jol.QTensor) and back["q4"].bits == 4
    assert _digests(back) == want
    for name, x in jax.tree_util.tree_flatten_with_path(back)[0]:
        if isinstance(x, jax.Array):
            assert x.sharding == _another_mesh_spec(None, x.shape, x.dtype), name
    assert any(x.sharding.spec == P("b", "a") for x in jax.tree.leaves(back)
               if isinstance(x, jax.Array))  # really resharded, not one device


def test_a_process_killed_before_the_index_leaves_the_previous_artifact(job, tmp_path):
    art, rows = job
    want = _saved(rows)[0]["digests"]
    # Process 0 died by SIGKILL inside the resave; the launcher then stopped process 1.
    assert rows[0]["returncode"] == -signal.SIGKILL, rows[0]["error"]
    index = json.loads((art / "index.json").read_text())
    listed = set(index["files"])
    unlisted = sorted(n for n in os.listdir(art) if n.startswith("shard-") and n not in listed)
    assert len(listed) == 2 and len(unlisted) == 2  # both processes' new files were written

    back, meta = jol.load_sharded(art, with_metadata=True)  # the previous artifact, intact
    assert meta == {"seed": 0}
    assert _digests(back) == want

    # The partial artifact by itself (its shard files, no index) is refused by name.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in unlisted:
        shutil.copy(art / name, partial / name)
    with pytest.raises(ValueError, match=r"index\.json: missing"):
        jol.load_sharded(partial)

    # So is a complete artifact that lost or cut one of its files.
    broken = tmp_path / "broken"
    shutil.copytree(art, broken)
    first, second = sorted(listed)
    (broken / first).unlink()
    with pytest.raises(ValueError, match=f"{first}: shard file missing"):
        jol.load_sharded(broken)
    shutil.copy(art / first, broken / first)
    raw = (broken / second).read_bytes()
    (broken / second).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{second}: corrupted"):
        jol.load_sharded(broken)

    # The next complete save removes the dead save's files.
    jol.save_sharded(art, back, metadata={"seed": 0})
    assert len([n for n in os.listdir(art) if n.startswith("shard-")]) == 1
    assert _digests(jol.load_sharded(art)) == want
