"""Landing an allocation exactly on a target's non-zero budget.

Spaces describe *where* sparsity goes (offsets, ramps, outlier rules); the budget says *how much*.
Raw per-layer sparsities are moved by one common additive shift, clipped to
``[0, MAX_LAYER_SPARSITY]``, found by bisection; the layers whose rounded prune count still changes
at that shift are then switched one at a time, so the total lands within one row-column of a single
layer of the budget. On a variant database's grid (``ctx.grid``), layers move in grid steps and one
layer then takes the remainder off the grid, so the total is as close to the budget as without it. Every candidate of one target therefore has the same size, and the comparison
between candidates is about quality alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.methods import prune_count
from autoprune.plan import LayerSpec, Plan
from search_spaces._base import SpaceContext

MAX_LAYER_SPARSITY = 0.95
_BISECTION_STEPS = 64


def project_to_budget(
    raw: dict[str, float], ctx: SpaceContext, target: float, removed_blocks: Sequence[int] = ()
) -> Plan:
    """A plan with ``raw``'s shape of allocation whose expected non-zeros are the closest reachable
    to ``(1 - target)`` of the dense decoder linear weights. ``raw`` covers the kept layers.

    NumPy, not torch: a screening round casts hundreds of candidates, and on arrays of a few
    hundred layers NumPy's per-call cost is a fraction of torch's; counts are integers held exactly in float64, so the result does not depend on the library."""
    names = list(raw)
    rows = np.array([ctx.layers[name].rows for name in names], dtype=np.float64)
    cols = np.array([ctx.layers[name].cols for name in names], dtype=np.float64)
    sparsity = np.array([raw[name] for name in names], dtype=np.float64)
    budget = round((1.0 - target) * ctx.dense_linear_params)

    def counts(shift: float) -> np.ndarray:
        shifted = np.clip(sparsity + shift, 0.0, MAX_LAYER_SPARSITY)
        if ctx.grid is not None:  # snapped to the database's grid, never above the cap
            shifted = np.floor(shifted * ctx.grid + 0.5) / ctx.grid
            shifted = np.where(shifted > MAX_LAYER_SPARSITY, shifted - 1.0 / ctx.grid, shifted)
        pruned = prune_count(shifted, cols)
        return np.minimum(pruned, cols - 1)  # a row always keeps a weight, even a narrow one

    def nonzeros(pruned: np.ndarray) -> int:
        return int((rows * (cols - pruned)).sum())

    low = -float(sparsity.max())  # everything dense: at least the budget
    high = MAX_LAYER_SPARSITY - float(sparsity.min())  # everything at the cap: at most the budget
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if nonzeros(counts(middle)) > budget:
            low = middle
        else:
            high = middle
    at_low, at_high = counts(low), counts(high)
    excess = nonzeros(at_low) - budget
    removed_by_switching = np.cumsum(rows * (at_high - at_low))
    misses = np.abs(excess - np.concatenate([[0.0], removed_by_switching]))
    switched = int(np.argmin(misses))
    final = np.concatenate([at_high[:switched], at_low[switched:]])
    if ctx.grid is not None:
        final = _off_grid_residual(final, rows, cols, nonzeros(final) - budget)
    layers = {
        name: LayerSpec(sparsity=float(count) / float(width))
        for name, count, width in zip(names, final.tolist(), cols.tolist(), strict=True)
    }
    return Plan(method=ctx.method, layers=layers, removed_blocks=list(removed_blocks))


def _off_grid_residual(pruned: np.ndarray, rows: np.ndarray, cols: np.ndarray, excess: float) -> np.ndarray:
    """``pruned`` with the one layer changed, off the grid, whose whole-row change best removes
    ``excess`` non-zeros: grid steps are too coarse to land on the budget, a single layer pruned
    directly is not."""
    cap = np.minimum(np.floor(MAX_LAYER_SPARSITY * cols), cols - 1)
    changed = np.clip(pruned + np.floor(excess / rows + 0.5), 0, cap)
    misses = np.abs(excess - rows * (changed - pruned))
    best = int(np.argmin(misses))
    result = pruned.copy()
    result[best] = changed[best]
    return result
