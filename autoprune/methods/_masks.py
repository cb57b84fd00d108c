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
