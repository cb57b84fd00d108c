"""Landing an allocation exactly on a target's non-zero budget.

Spaces describe *where* sparsity goes (offsets, ramps, outlier rules); the budget says *how much*.
Raw per-layer sparsities are moved by one common additive shift, clipped to
``[0, MAX_LAYER_SPARSITY]``, found by bisection; the layers whose rounded prune count still changes
at that shift are then switched one at a time, so the total lands within one row-column of a single
layer of the budget. Every candidate of one target therefore has the same size, and the comparison
between candidates is about quality alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoprune.methods import prune_count
from autoprune.plan import LayerSpec, Plan
from search_spaces._base import SpaceContext

MAX_LAYER_SPARSITY = 0.95
_BISECTION_STEPS = 64


def project_to_budget(
    raw: dict[str, float], ctx: SpaceContext, target: float, removed_blocks: Sequence[int] = ()
) -> Plan:
    """A plan with ``raw``'s shape of allocation whose expected non-zeros are the closest reachable
    to ``(1 - target)`` of the dense decoder linear weights. ``raw`` covers the kept layers."""
    names = list(raw)
    rows = torch.tensor([ctx.layers[name].rows for name in names], dtype=torch.float64)
    cols = torch.tensor([ctx.layers[name].cols for name in names], dtype=torch.float64)
    sparsity = torch.tensor([raw[name] for name in names], dtype=torch.float64)
    budget = round((1.0 - target) * ctx.dense_linear_params)

    def counts(shift: float) -> torch.Tensor:
        pruned = prune_count((sparsity + shift).clamp(0.0, MAX_LAYER_SPARSITY), cols)
        return torch.minimum(pruned, cols - 1)  # a row always keeps a weight, even a narrow one

    def nonzeros(pruned: torch.Tensor) -> int:
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
    removed_by_switching = torch.cumsum(rows * (at_high - at_low), 0)
    misses = (excess - torch.cat([torch.zeros(1, dtype=torch.float64), removed_by_switching])).abs()
    switched = int(torch.argmin(misses))
    final = torch.cat([at_high[:switched], at_low[switched:]])
    layers = {
        name: LayerSpec(sparsity=float(count) / float(width))
        for name, count, width in zip(names, final.tolist(), cols.tolist(), strict=True)
    }
    return Plan(method=ctx.method, layers=layers, removed_blocks=list(removed_blocks))
