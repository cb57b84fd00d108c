"""Pure tensor functions that turn importance scores into masks.

Masks here mark the weights to *keep*. Sparsity is per output row (each row loses
``round(sparsity * in_features)`` weights), the comparison group that Wanda found right for LLMs
and that makes the sparsity of a layer exact rather than approximate.
"""

from __future__ import annotations

import numpy as np
import torch


def prune_count(
    sparsity: float | torch.Tensor | np.ndarray, width: int | np.ndarray
) -> torch.Tensor | np.ndarray | int:
    """Weights removed from a row of ``width`` inputs: ``round(sparsity * width)``, half up.
    Element-wise for tensors and arrays (search spaces plan with NumPy, methods prune with torch)."""
    if isinstance(sparsity, torch.Tensor):
        return torch.floor(sparsity * width + 0.5).to(torch.long)
    if isinstance(sparsity, np.ndarray):
        return np.floor(sparsity * width + 0.5).astype(np.int64)
    return int(sparsity * width + 0.5)


def prune_order(scores: torch.Tensor) -> torch.Tensor:
    """Per row, input indices from least to most important: computed once per layer, then every
    sparsity level is a prefix of it. Stored in the narrowest integer type that fits."""
    order = torch.argsort(scores, dim=1, stable=True)
    return order.to(torch.int16 if scores.shape[1] <= torch.iinfo(torch.int16).max else torch.int32)


def keep_mask_from_order(order: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep everything but the first ``n_prune`` entries of each row's ``order``."""
    keep = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    if n_prune:
        keep.scatter_(1, order[:, :n_prune].to(torch.long), False)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def lowest_per_row(saliency: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mark each row's ``count`` lowest saliencies, in the column-major layout the second-order
    methods work in (``saliency [B, cols, rows]``, ``count [B, rows]``); ties at the cut-off go to
    the lower column, as a stable sort would order them.

    A row's cut-off is its ``count``-th smallest saliency, found by partial selection rather than
    a full sort, in the layout as it is (a transposed copy cost more than it saved). Rows of one
    layer share a count, so selection runs once per run of equal counts and the comparison once
    for the whole batch.
    """
    cutoff = torch.full(count.shape, -torch.inf, dtype=saliency.dtype, device=saliency.device)
    for index, first, last, k in _equal_runs(count):
        if k > 0:
            cutoff[index, first:last] = _kth_smallest(saliency[index, :, first:last], k)
    chosen = saliency <= cutoff.unsqueeze(1)
    # Counting in bytes is exact for fewer than 256 columns and much faster than in int64.
    counter = torch.uint8 if saliency.shape[1] < 256 else torch.int32
    over = chosen.view(torch.uint8).sum(dim=1, dtype=counter) > count
    # Where several saliencies tie at the cut-off, only the leftmost ones the count still needs go.
    for index, row in torch.nonzero(over).tolist():
        values, limit = saliency[index, :, row], cutoff[index, row]
        ties = values == limit
        wanted = count[index, row] - (values < limit).sum()
        chosen[index, :, row] = (values < limit) | (ties & (torch.cumsum(ties, dim=0) <= wanted))
    return chosen


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Each column's ``k``-th smallest value (``values`` is ``[cols, rows]``), through a partial
    selection of the shorter side."""
    width = values.shape[0]
    if 2 * k <= width:
        return torch.topk(values, k, dim=0, largest=False, sorted=False).values.amax(dim=0)
    return torch.topk(values, width - k + 1, dim=0, sorted=False).values.amin(dim=0)


def _equal_runs(count: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(batch index, first row, end row, count)`` for every run of rows with one count."""
    changes = count[:, 1:] != count[:, :-1]
    runs = []
    for index in range(count.shape[0]):
        cuts = [0, *(torch.nonzero(changes[index]).flatten() + 1).tolist(), count.shape[1]]
        for first, last, k in zip(cuts[:-1], cuts[1:], count[index, cuts[:-1]].tolist(), strict=True):
            runs.append((index, first, last, k))
    return runs
