"""Each kernel's input, as the matrix its contraction multiplies: for calibration.

`layer_inputs` runs a linen or NNX model through the hook layer and returns, next to the
model's output, the input of every selected kernel contraction as a 2-D matrix ``X`` of
shape ``(rows, K)``: one row per output position (token, pixel) and the columns in the
order of the kernel's contracting axes flattened, so that ``X @ W.reshape(K, N)`` is the
layer's pre-bias output when ``W`` is the kernel with its contracting axes first. A
convolution's input is given as its patches (``lax.conv_general_dilated_patches``), so a
conv is calibrated as the matrix product it is.

It is a pure function: under ``jit`` (and ``pmap``/``shard_map``) the caller reduces the
matrices into whatever statistics it needs (``X.T @ X`` for GPTQ and SparseGPT, column
norms for Wanda, absolute maxima for AWQ and SmoothQuant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.mapping import Names, path_names


def _dot_input(eqn, operand: int, view: flax_hooks.View, x: jax.Array) -> jax.Array | None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    mine, other = (lc, rc) if operand == 0 else (rc, lc)
    if (lb if operand == 0 else rb):
        return None  # a kernel with batch axes is several matrices, not one
    perm = flax_hooks.operand_permutation(view)
    if perm is None:
        return None
    pairs = sorted(zip((perm[d] for d in mine), other))  # x dims in leaf-axis order
    x_con = [d for _, d in pairs]
    x_free = [d for d in range(x.ndim) if d not in x_con]
    k = int(np.prod([x.shape[d] for d in x_con]))
    return jnp.transpose(x, x_free + x_con).reshape(-1, k)


def _conv_input(eqn, view: flax_hooks.View, x: jax.Array, kernel_shape) -> jax.Array | None:
    perm = flax_hooks.operand_permutation(view)
    p = eqn.params
    if perm is None or p["batch_group_count"] != 1 or p["feature_group_count"] != 1:
        return None
    dn = p["dimension_numbers"]
    spatial = [kernel_shape[perm[d]] for d in dn.rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        x, spatial, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"], dimension_numbers=dn,
        precision=lax.Precision.HIGHEST)
    # Patch features come channel-major, then the spatial dims in rhs_spec order.
    feat = dn.out_spec[1]
    rest = [d for d in range(patches.ndim) if d != feat]
    cols = jnp.transpose(patches, rest + [feat])
    rows = int(np.prod(cols.shape[:-1]))
    cols = cols.reshape(rows, x.shape[dn.lhs_spec[1]], *spatial)
    leaf_axes = [perm[d] for d in dn.rhs_spec[1:]]  # leaf axis of (in, *spatial)
    order = sorted(range(len(leaf_axes)), key=lambda i: leaf_axes[i])
    return jnp.transpose(cols, [0] + [1 + i for i in order]).reshape(rows, -1)


def layer_inputs(
    model: Any,
    variables: Any,
    *args: Any,
    where: Callable[[Names], bool] | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[Names, jax.Array]]:
    """Runs the model and returns ``(output, {kernel names: X})`` (see module docstring).

    Args:
      model: a linen module or an NNX module/graphdef.
      variables: its variables (linen) or state (NNX; ``None`` for the module's own).
      *args: the call's inputs.
      where: ``names -> bool`` choosing the kernels to capture (default: every kernel of a
        ``dot_general`` or a convolution whose input can be written as a matrix).
      **kwargs: static keyword arguments of the call.

    Returns:
      The model's output and, per captured kernel (keyed by its names from the root of
      ``variables``), its input matrix; a kernel used several times (a tied embedding)
      gets the rows of every use stacked.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_lab.core.capture import layer_inputs
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 5, 4))
      >>> v = model.init(jax.random.PRNGKey(0), x)
      >>> y, xs = layer_inputs(model, v, x)
      >>> xs[("params", "kernel")].shape
      (10, 4)
    """
    program = flax_hooks.trace(model, variables, *args, **kwargs)
    names = [path_names(p) for p in program.paths]
    captured: dict[Names, list[jax.Array]] = {}

    def hook(eqn, uses, views, read, leaf_values):
        for use, view in zip(uses, [v for v in views if v is not None]):
            key = names[view.leaf]
            if use.op not in ("dot_general", "conv") or (where is not None and not where(key)):
                continue
            other = read(eqn.invars[1 - use.operand])
            if use.op == "dot_general":
                mat = _dot_input(eqn, use.operand, view, other)
            else:
                mat = _conv_input(eqn, view, other, np.shape(leaf_values[view.leaf]))
            if mat is not None:
                captured.setdefault(key, []).append(mat)
        return None

    out = flax_hooks.run(program, program.leaves, jax.tree.leaves(args), hook=hook)
    return out, {k: v[0] if len(v) == 1 else jnp.concatenate(v) for k, v in captured.items()}
