"""A SIGKILLed process ends a two-process job within the heartbeat timeout (no hang), and
restarting both resumes from the last checkpoint to the bit-identical final params."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_mp_resumable_worker.py")
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
# The workers compile like this process (conftest.py's codegen level): results compared
# across processes come from the same compiler settings.
_CODEGEN = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                    if "xla_backend_optimization_level" in f)
HEARTBEAT_S = 5  # short, so the test is fast; the library default is 100 s
SURVIVOR_BOUND_S = 90  # heartbeat detection + error propagation, with a loaded machine's slack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(work: Path, ckpt: Path, tag: str) -> tuple[list, list]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {_CODEGEN}")
    port, procs, logs = _free_port(), [], []
    for i in range(NUM_PROCESSES):
        logs.append(work / f"{tag}_{i}.log")
        with open(logs[-1], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port),
                 str(LOCAL_DEVICES), str(work), str(ckpt), str(HEARTBEAT_S)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _tail(path: Path, n: int = 2500) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if not ln.startswith("[Gloo]")]
    return "\n".join(lines)[-n:]


def _wait(procs, logs, timeout):
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:  # only our own children, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _run_to_end(work, ckpt, tag):
    procs, logs = _start(work, ckpt, tag)
    codes = _wait(procs, logs, 240)
    if codes != [0] * NUM_PROCESSES:
        pytest.fail(f"{tag} failed {codes}:\n" + "\n".join(_tail(log) for log in logs))


def _final(work, ckpt):
    return [dict(np.load(work / f"{ckpt.name}_process_{i}.npz")) for i in range(NUM_PROCESSES)]


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if ckpt.exists() else []


@pytest.mark.skipif(os.environ.get("JAXOPT_LAB_FAULT_TESTS") != "1",
                    reason="about 4-5 minutes per case (three two-process jobs each): run with "
                           "JAXOPT_LAB_FAULT_TESTS=1")
@pytest.mark.parametrize("victim", [1, 0])  # a worker, and the coordinator's process
def test_sigkill_ends_the_job_in_bounded_time_and_resume_is_bit_identical(tmp_path, victim):
    # The interrupted run: kill one process once a checkpoint past the first is written.
    ckpt = tmp_path / "interrupted"
    procs, logs = _start(tmp_path, ckpt, "killed")
    try:
        deadline = time.monotonic() + 180
        while len(_steps(ckpt)) < 2 and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                pytest.fail("a worker ended early:\n" + "\n".join(_tail(log) for log in logs))
            time.sleep(0.05)
        assert len(_steps(ckpt)) >= 2, "no checkpoint within 180 s"
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = procs[1 - victim]
        while survivor.poll() is None and time.monotonic() - killed_at < SURVIVOR_BOUND_S:
            time.sleep(0.1)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[victim].returncode == -signal.SIGKILL
    code, log = survivor.returncode, _tail(logs[1 - victim], 6000)
    print(f"survivor of a SIGKILLed process {victim} exited ({code}) after {waited:.1f} s")
    assert waited < SURVIVOR_BOUND_S, f"survivor still running after {waited:.0f} s:\n{log}"
    assert code != 0, log
    # A clear error: the coordination service names the dead task / the lost heartbeat,
    # or gloo names the closed connection to the peer.
    assert any(s in log.lower() for s in ("heartbeat", "unavailable", "connection",
                                          "task", "peer")), log
    assert _steps(ckpt)[-1] < 40, "the run finished before the kill"

    # Restarting both resumes from the newest complete checkpoint and finishes...
    _run_to_end(tmp_path, ckpt, "resumed")
    # ...bit-identical to a run never interrupted.
    clean = tmp_path / "clean"
    _run_to_end(tmp_path, clean, "clean")
    for got, want in zip(_final(tmp_path, ckpt), _final(tmp_path, clean)):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
