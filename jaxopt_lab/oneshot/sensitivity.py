"""Per-layer sensitivity sweep and a mixed assignment under a budget.

`sensitivity` measures, for every selected ``(K, N)`` kernel and every candidate setting
(bit width of round-to-nearest, or sparsity of magnitude pruning), the relative output
error ``sqrt(tr(dW^T H dW) / tr(W^T H W))`` on the calibration inputs (``H = X^T X``). All
layers and all settings run in one compiled program: the settings are a ``vmap`` axis
(the integer range and the pruned count are traced values, not compile-time constants).

`propose` then picks one setting per layer that minimises the summed error under a total
budget (bytes for bit widths, kept weights for sparsities), by Lagrangian relaxation plus
a greedy fill of what budget is left, and never returns worse than the best uniform
assignment that fits. The result maps each leaf path string to its per-leaf overrides
(``{"bits": 3}`` or ``{"sparsity": 0.5}``); `as_where` turns it into a ``where`` callable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.oneshot.stats import LayerStats, check_stats
from jaxopt_lab.quant.affine import divide, round_half_away


class Sensitivity(NamedTuple):
    """``errors[name]``: relative output error per option (``(len(options),)``);
    ``costs[name]``: bytes (bits) or kept weights (sparsity) per option; ``kind``:
    ``"bits"`` or ``"sparsity"``; ``options``: the candidate settings."""

    errors: dict[str, np.ndarray]
    costs: dict[str, np.ndarray]
    kind: str
    options: tuple[float, ...]


def _rtn(w, qmax, g):
    """Symmetric round-to-nearest with ``qmax`` traced; groups of ``g`` rows."""
    k, n = w.shape
    wg = w.reshape(k // g, g, n)
    s = jnp.max(jnp.abs(wg), axis=1, keepdims=True) / qmax
    s = jnp.where(s > 0, s, 1.0)
    # The rounding and the exact division of `jaxopt_lab.quantize`, so ties agree with it.
    return (jnp.clip(round_half_away(divide(wg, s)), -qmax, qmax) * s).reshape(k, n)


def _magnitude(w, prune):
    """``w`` with its ``prune`` smallest magnitudes zeroed (``prune`` traced)."""
    flat = jnp.abs(w).reshape(-1)
    rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    return jnp.where((rank >= prune).reshape(w.shape), w, 0.0)


def _rel(w, v, h):
    d = w - v
    hp = jax.lax.Precision.HIGHEST
    num = jnp.sum(d * jnp.matmul(h, d, precision=hp))
    den = jnp.sum(w * jnp.matmul(h, w, precision=hp))
    return jnp.sqrt(jnp.maximum(num, 0.0) / jnp.where(den > 0, den, 1.0))


def sensitivity(weights: Mapping[str, jax.typing.ArrayLike], stats: Mapping[str, LayerStats],
                *, bits: Sequence[int] | None = None, sparsities: Sequence[float] | None = None,
                group_size: int | None = None) -> Sensitivity:
    """Errors of every layer at every setting, one compiled program for all of them.

    Args:
      weights: ``{name: (K, N) kernel}`` (Flax layout, rows = contracted inputs).
      stats: ``{name: LayerStats}`` of each kernel's input.
      bits: candidate bit widths (2..8) of symmetric round-to-nearest; or
      sparsities: candidate fractions pruned by magnitude (per layer), in ``[0, 1]``.
      group_size: rows per scale for ``bits`` (``None``: one scale per output).

    Returns:
      A `Sensitivity`.

    Raises:
      ValueError: naming the layer, for missing statistics, a group size that does not
        divide ``K``; or for giving both or neither of ``bits`` and ``sparsities``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, sensitivity
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> w = {"a": jax.random.normal(jax.random.key(1), (8, 4))}
      >>> s = sensitivity(w, {"a": hessian_accumulate(hessian_init(8), x)}, bits=(2, 4, 8))
      >>> bool(s.errors["a"][0] > s.errors["a"][1] > s.errors["a"][2])
      True
    """
    if (bits is None) == (sparsities is None):
        raise ValueError("sensitivity: give exactly one of bits= and sparsities=")
    kind = "bits" if bits is not None else "sparsity"
    options = tuple(bits) if bits is not None else tuple(float(s) for s in sparsities)
    if kind == "bits" and any(int(b) != b or not 2 <= b <= 8 for b in options):
        raise ValueError(f"sensitivity: bits must be integers in 2..8, got {options}")
    if kind == "sparsity" and any(not 0.0 <= s <= 1.0 for s in options):
        raise ValueError(f"sensitivity: sparsities must be in [0, 1], got {options}")
    ws, hs, costs = {}, {}, {}
    for name, w in weights.items():
        w = jnp.asarray(w, jnp.float32)
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a (K, N) kernel, got shape {w.shape}")
        k, n = w.shape
        st = stats.get(name)
        check_stats(name, st, k)
        g = group_size or k
        if k % g:
            raise ValueError(f"{name}: group_size={group_size} does not divide K={k}")
        ws[name], hs[name] = w, st.xtx
        if kind == "bits":
            costs[name] = np.array([k * n * b / 8 + 4 * (k // g) * n for b in options])
        else:
            costs[name] = np.array([k * n - int(np.floor(np.float32(s) * k * n))
                                    for s in options], np.float64)
    if kind == "bits":
        levels = jnp.asarray([2 ** (int(b) - 1) - 1 for b in options], jnp.float32)
        prunes = None
    else:
        levels = None
        prunes = {nm: jnp.asarray([k * n - c for c in costs[nm]], jnp.int32)
                  for nm, (k, n) in ((nm, ws[nm].shape) for nm in ws)}

    @jax.jit
    def all_errors(ws, hs, levels, prunes):
        out = {}
        for nm, w in ws.items():
            if levels is not None:
                g = group_size or w.shape[0]
                out[nm] = jax.vmap(lambda q, w=w, nm=nm, g=g: _rel(w, _rtn(w, q, g), hs[nm]))(
                    levels)
            else:
                out[nm] = jax.vmap(lambda p, w=w, nm=nm: _rel(w, _magnitude(w, p), hs[nm]))(
                    prunes[nm])
        return out

    errs = all_errors(ws, hs, levels, prunes)
    return Sensitivity({k: np.asarray(v, np.float64) for k, v in errs.items()}, costs, kind,
                       options)


def _total(sens, pick):
    err = sum(sens.errors[k][i] for k, i in pick.items())
    cost = sum(sens.costs[k][i] for k, i in pick.items())
    return err, cost


def propose(sens: Sensitivity, budget: float) -> dict[str, dict[str, Any]]:
    """One setting per layer: least summed error with total cost ``<= budget``.

    Args:
      sens: from `sensitivity`.
      budget: total bytes (``bits``) or total kept weights (``sparsity``) allowed.

    Returns:
      ``{name: {"bits": b}}`` or ``{name: {"sparsity": s}}``; its total cost never
      exceeds ``budget`` and its summed error is never above that of any uniform
      assignment (every layer the same option) that fits.

    Raises:
      ValueError: when even the cheapest option of every layer exceeds ``budget``.

    Examples:
      >>> import numpy as np
      >>> s = Sensitivity({"a": np.array([0.5, 0.1]), "b": np.array([0.2, 0.15])},
      ...                 {"a": np.array([2.0, 4.0]), "b": np.array([2.0, 4.0])}, "bits",
      ...                 (2, 4))
      >>> propose(s, 6.0)
      {'a': {'bits': 4}, 'b': {'bits': 2}}
    """
    names = list(sens.errors)
    cheapest = {k: int(np.argmin(sens.costs[k])) for k in names}
    if _total(sens, cheapest)[1] > budget:
        raise ValueError(f"propose: budget {budget} is below the cheapest assignment "
                         f"({_total(sens, cheapest)[1]})")

    def best_for(lam):
        return {k: int(np.argmin(sens.errors[k] + lam * sens.costs[k])) for k in names}

    lo, hi = 0.0, 1.0
    while _total(sens, best_for(hi))[1] > budget and hi < 1e30:
        hi *= 4.0
    if _total(sens, best_for(lo))[1] <= budget:
        pick = best_for(lo)
    else:
        for _ in range(100):  # bisection: the cheapest multiplier whose choice fits
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if _total(sens, best_for(mid))[1] <= budget else (mid, hi)
        pick = best_for(hi)
    # Greedy fill: spend what is left on the upgrade with the best error drop per cost.
    while True:
        err, cost = _total(sens, pick)
        best = None
        for k in names:
            for i in range(len(sens.options)):
                dc = sens.costs[k][i] - sens.costs[k][pick[k]]
                de = sens.errors[k][pick[k]] - sens.errors[k][i]
                if de > 0 and cost + dc <= budget and (best is None or de > best[0]):
                    best = (de, k, i)
        if best is None:
            break
        pick[best[1]] = best[2]
    for i in range(len(sens.options)):
        uniform = {k: i for k in names}
        if _total(sens, uniform)[1] <= budget and (
                _total(sens, uniform)[0] < _total(sens, pick)[0]):
            pick = uniform
    return {k: {sens.kind: sens.options[i]} for k, i in pick.items()}


def as_where(assignment: Mapping[str, Mapping[str, Any]]):
    """A ``where`` callable giving each named leaf its overrides (others unselected).

    Examples:
      >>> w = as_where({"['a']": {"bits": 4}})
      >>> import jax
      >>> w(jax.tree_util.tree_flatten_with_path({"a": 1})[0][0][0], None)
      {'bits': 4}
    """
    from jaxopt_lab._select import path_str

    def where(path, leaf):
        del leaf
        return dict(assignment.get(path_str(path), {})) or False
    return where
