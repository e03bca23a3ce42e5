"""Checkpointer under a full disk: earlier steps intact, no temporaries, a clear error."""

import errno
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxopt_lab.train.checkpoint import Checkpointer

OLD = {"w": jnp.arange(16.0)}


def _big():
    # Random, so that orbax's compression can't shrink it below the size limit.
    return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16,)), jnp.float32)}


def _assert_step0_only(directory):
    assert os.listdir(directory) == ["0"], os.listdir(directory)  # no temporary left
    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [0]
        np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(16)})[0]["w"], OLD["w"])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch, asynchronous):
    """ENOSPC emulated in the write of the step's second item, after the first is on disk."""
    directory = tmp_path / "ckpt"

    async def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metadata")

    with Checkpointer(directory, asynchronous=asynchronous) as ckpt:
        ckpt.save(0, OLD)
        ckpt.wait_until_finished()
        monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full)
        with pytest.raises(OSError, match="No space left on device") as info:
            ckpt.save(1, _big())
            ckpt.wait_until_finished()
        monkeypatch.undo()
        assert info.value.errno == errno.ENOSPC
        assert str(directory) in str(info.value) and "step 1" in str(info.value)
        assert ckpt.all_steps() == [0]
    _assert_step0_only(directory)
    with Checkpointer(directory) as ckpt:  # and saving goes on once there is room
        ckpt.save(1, _big())
        assert ckpt.all_steps() == [0, 1]


def test_real_file_size_limit_during_a_checkpoint(tmp_path):
    """A real kernel error (EFBIG under RLIMIT_FSIZE, SIGXFSZ ignored) inside tensorstore's
    writes, in a child process so that the limit touches nothing else."""
    directory = tmp_path / "ckpt"
    code = textwrap.dedent(f"""
        import errno, resource, signal
        import jax.numpy as jnp, numpy as np
        from jaxopt_lab.train.checkpoint import Checkpointer
        with Checkpointer({str(directory)!r}) as ckpt:
            ckpt.save(0, {{"w": jnp.arange(16.0)}})
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
            big = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
            try:
                ckpt.save(1, {{"w": big}})
            except OSError as e:
                assert e.errno == errno.EFBIG, e
                assert {str(directory)!r} in str(e) and "step 1" in str(e), e
                print("EFBIG", e)
            else:
                raise SystemExit("save did not fail")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EFBIG" in out.stdout and "File too large" in out.stdout
    _assert_step0_only(directory)
