"""save / load under faults: full disks, file-size limits, hostile headers, directories."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol

OLD = {"w": jnp.arange(6.0)}
NEW = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}


def _assert_only_old(path):
    assert os.listdir(path.parent) == [path.name]  # no temporary left behind
    np.testing.assert_array_equal(jol.load(path)["w"], OLD["w"])


class _FullDisk:
    """A binary file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        n = memoryview(b).nbytes
        if n > self.room:
            self.f.write(bytes(memoryview(b).cast("B")[: self.room]))  # a partial write
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@given(room=st.integers(0, 16_000))  # the new file is ~17 kB
def test_disk_full_during_save_keeps_previous_file(tmp_path_factory, room):
    path = tmp_path_factory.mktemp("full") / "m.safetensors"
    jol.save(path, OLD)
    real = os.fdopen
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))
        with pytest.raises(OSError, match="No space left on device") as info:
            jol.save(path, NEW)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in str(info.value)
    _assert_only_old(path)


def test_disk_full_reported_at_fsync(tmp_path, monkeypatch):
    # Some filesystems (NFS, thin provisioning) only report ENOSPC when data is flushed.
    path = tmp_path / "m.safetensors"
    jol.save(path, OLD)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=f"No space left.*{path.name}"):
        jol.save(path, NEW)
    monkeypatch.undo()
    _assert_only_old(path)


def test_real_file_size_limit_during_save(tmp_path):
    """A real kernel error path without root: RLIMIT_FSIZE makes write() fail with EFBIG
    (SIGXFSZ ignored), in a child process so the limit touches nothing else."""
    path = tmp_path / "m.safetensors"
    jol.save(path, OLD)
    limit = os.path.getsize(path) + 4096  # the old file fits, the new one does not
    code = textwrap.dedent(f"""
        import errno, resource, signal
        import jax.numpy as jnp, jaxopt_lab as jol
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            jol.save({str(path)!r}, {{"w": jnp.ones((256, 256))}})
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            assert {str(path)!r} in str(e), e
            print("EFBIG", e)
        else:
            raise SystemExit("save did not fail")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EFBIG" in out.stdout and "File too large" in out.stdout
    _assert_only_old(path)


def _raw_file(path, header_bytes):
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_header_is_a_value_error(tmp_path, depth):
    path = tmp_path / "deep.safetensors"
    _raw_file(path, b"[" * depth + b"]" * depth)
    for fn in (jol.load, jol.load_metadata):
        with pytest.raises(ValueError, match="deep.safetensors"):
            fn(path)
    # Nested inside the jaxopt_lab metadata string, and as a header value.
    nested = "[" * depth + "]" * depth
    _raw_file(path, json.dumps({"__metadata__": {"format": "jaxopt_lab",
                                                 "jaxopt_lab": nested}}).encode())
    for fn in (jol.load, jol.load_metadata):
        with pytest.raises(ValueError, match="deep.safetensors"):
            fn(path)
    _raw_file(path, ('{"x":' + nested + "}").encode())
    for fn in (jol.load, jol.load_metadata):
        with pytest.raises(ValueError, match="deep.safetensors"):
            fn(path)


def test_load_of_a_directory_says_so(tmp_path):
    for fn in (jol.load, jol.load_metadata):
        with pytest.raises(ValueError, match="is a directory"):
            fn(tmp_path)
