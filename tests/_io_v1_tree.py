"""The tree in tests/data/io_v1.safetensors, written by the hand-made (format version 1) writer
of jaxopt_lab.io at commit ef40789, before io moved to the safetensors package."""
import jax.numpy as jnp
import numpy as np

import jaxopt_lab as jol

METADATA = {"step": 3, "note": "v1"}


def tree():
    rng = np.random.default_rng(17)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    return {
        "dense": {"kernel": w, "bias": np.arange(6, dtype=np.int16)},
        "q8": jol.quantize({"k": w}, bits=8)["k"],
        "q4": jol.quantize({"k": w}, bits=4, granularity="group", group_size=4)["k"],
        "bf16": jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16),
        "mask": np.array([True, False, True]),
        "scalar": np.float32(2.5),
        "py": [1, 2.5, "s", None, (True,)],
        "empty": np.zeros((0, 3), np.float32),
    }
