"""Block-by-block calibration: each block sees the outputs of the already-compressed ones.

GPTQ and SparseGPT are meant to run this way: block ``i`` is calibrated on what the
compressed blocks ``0..i-1`` actually produce, so later blocks correct earlier errors.
Only one block's statistics live at a time (plus the calibration activations between two
blocks), so peak memory is bounded by the largest block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxopt_lab.oneshot.stats import LayerStats, hessian_accumulate, hessian_init
from jaxopt_lab.quant import dequantize

Params = Any
Capture = Callable[[Params, Any], tuple[Any, Mapping[str, jax.Array]]]
Compress = Callable[[int, Params, Mapping[str, LayerStats]], Params]


def block_stats(capture: Capture, params: Params, batches: Sequence[Any], *,
                axis_name: str | None = None) -> tuple[dict[str, LayerStats], list[Any]]:
    """Runs one block over every batch, accumulating the statistics of each captured input.

    Args:
      capture: ``capture(params, batch) -> (next batch, {input name: inputs (..., K)})``;
        an input may be a pair ``(inputs, row mask)`` to leave padding rows out (see
        `hessian_accumulate`).
      params: the block's parameters.
      batches: the block's calibration inputs, one entry per batch.
      axis_name: reduce the statistics over this mapped axis (see `hessian_accumulate`).

    Returns:
      ``(stats by input name, next batches)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> cap = lambda p, x: (x @ p["w"], {"w": x})
      >>> stats, nxt = block_stats(cap, {"w": jnp.eye(2)}, [jnp.ones((3, 2))])
      >>> int(stats["w"].count), nxt[0].shape
      (3, (3, 2))
    """
    stats: dict[str, LayerStats] = {}
    outs = []
    for b in batches:
        out, inputs = capture(params, b)
        for name, x in inputs.items():
            x, mask = x if isinstance(x, tuple) else (x, None)
            if name not in stats:
                stats[name] = hessian_init(x.shape[-1])
            stats[name] = hessian_accumulate(stats[name], x, mask=mask, axis_name=axis_name)
        outs.append(out)
    return stats, outs


def sequential(
    blocks: Sequence[Params],
    batches: Sequence[Any],
    *,
    capture: Capture,
    compress: Compress,
) -> list[Params]:
    """Compresses ``blocks`` in order, each calibrated on the compressed blocks' outputs.

    Args:
      blocks: the parameters of each block, in execution order.
      batches: the first block's calibration inputs, one entry per batch (anything
        ``capture`` accepts, e.g. ``(hidden, attention mask)``).
      capture: ``capture(block params, batch) -> (next batch, {input name: inputs})``;
        the next batch is the block's output in the same form as its input.
      compress: ``compress(index, block params, stats by input name) -> new params``
        (QTensor leaves are dequantized to feed the next block).

    Returns:
      The compressed parameters of every block.

    Raises:
      ValueError: when there are no calibration batches.

    Examples:
      >>> import jax.numpy as jnp
      >>> cap = lambda p, x: (x @ p["w"], {"w": x})
      >>> halve = lambda i, p, s: {"w": p["w"] / 2}
      >>> out = sequential([{"w": jnp.eye(2)}] * 2, [jnp.ones((1, 2))], capture=cap,
      ...                  compress=halve)
      >>> [float(b["w"][0, 0]) for b in out]
      [0.5, 0.5]
    """
    if len(batches) == 0:
        raise ValueError("sequential: no calibration data (0 batches)")
    done = []
    for i, params in enumerate(blocks):
        stats, _ = block_stats(capture, params, batches)
        new = compress(i, params, stats)
        del stats  # one block's statistics at a time
        done.append(new)
        if i + 1 < len(blocks):
            dense = dequantize(new)
            batches = [capture(dense, b)[0] for b in batches]
    return done
