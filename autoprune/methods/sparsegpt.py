"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and let the remaining weights of
each row absorb the error, through the inverse layer Hessian (optimal brain surgeon updates).

The core, :func:`sparsegpt_prune`, works on a batch of layers at once: the layers reading one input
share an inverse Hessian, so their rows are stacked, and blocks of equal shape are stacked along a
batch dimension. A whole model then takes one column loop per stacked shape (four on LLaMA: q/k/v,
o, gate/up, down) instead of one per layer.
"""

from __future__ import annotations

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._masks import lowest_per_row, prune_count
from autoprune.methods._stacked import Factors, StackedRowsMethod
from autoprune.plan import NMPattern


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, as SparseGPT's updates read it.

    Inputs that never fired (zero diagonal) get a unit diagonal so the factorization exists.
    """
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    row_sparsity: torch.Tensor | None = None,
    nm: NMPattern | None = None,
    mask_block: int = 128,
    update_block: int = 32,
) -> torch.Tensor:
    """Prune a batch of weight matrices ``[B, rows, cols]`` with their inverse-Hessian factors
    ``[B, cols, cols]``; ``weight`` is left as it is.

    Unstructured (``row_sparsity [B, rows]``): every ``mask_block`` columns, each row drops the
    lowest ``w^2 / [H^-1]_jj^2`` among the next columns, with per-block counts rounded cumulatively
    so every row loses exactly ``round(s * cols)`` weights. N:M (``nm``): each group of ``m``
    columns keeps its ``n`` best. The result is a ``[B, rows, cols]`` view of column-major storage
    (see :func:`sparsegpt_prune_columns_`).
    """
    columns = weight.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    sparsegpt_prune_columns_(columns, hinv, row_sparsity, nm, mask_block, update_block)
    return columns.transpose(1, 2).to(weight.dtype)


@torch.no_grad()
def sparsegpt_prune_columns_(
    columns: torch.Tensor,
    hinv: torch.Tensor,
    row_sparsity: torch.Tensor | None = None,
    nm: NMPattern | None = None,
    mask_block: int = 128,
    update_block: int = 32,
) -> None:
    """:func:`sparsegpt_prune` in place on contiguous float32 ``columns [B, cols, rows]``: the
    transposed weights, because a column is the unit of work. A caller that stacks layers builds
    this layout once and reads the result through a transposed view; converting on the way in
    and out would cost two strided copies of every weight per plan.

    Updates are applied lazily in two tiers: within a mask block every ``update_block`` columns
    (small, and the next columns' sweep reads them), beyond it once per mask block (one large
    product instead of several thin ones, which were memory-bound). Both are exact.
    """
    if (row_sparsity is None) == (nm is None):
        raise ValueError("give exactly one of row_sparsity and nm")
    if columns.dtype != torch.float32 or not columns.is_contiguous():
        raise ValueError("columns must be contiguous float32 [B, cols, rows]")
    cols = columns.shape[1]
    if nm is not None and (cols % nm.m or update_block % nm.m):
        raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}, got {cols}")
    pruned = torch.zeros_like(columns, dtype=torch.bool)
    diag = torch.diagonal(hinv, dim1=1, dim2=2)
    for block_start in range(0, cols, mask_block):
        block_end = min(block_start + mask_block, cols)
        if row_sparsity is not None:
            _select_unstructured(columns, diag, pruned, row_sparsity, block_start, block_end)
        # A pruned weight's error, divided by its pivot, is what the later columns absorb.
        errors = torch.zeros_like(columns[:, block_start:block_end])
        for start in range(block_start, block_end, update_block):
            end = min(start + update_block, block_end)
            done = errors[:, start - block_start : end - block_start]
            _sweep_columns(columns, hinv, diag, pruned, done, start, end, nm)
            rest_of_block = hinv[:, start:end, end:block_end].transpose(1, 2)
            columns[:, end:block_end].baddbmm_(rest_of_block, done, alpha=-1.0)
        beyond_block = hinv[:, block_start:block_end, block_end:].transpose(1, 2)
        columns[:, block_end:].baddbmm_(beyond_block, errors, alpha=-1.0)


def _sweep_columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    diag: torch.Tensor,
    pruned: torch.Tensor,
    errors: torch.Tensor,
    start: int,
    end: int,
    nm: NMPattern | None,
) -> None:
    """The optimal-brain-surgeon updates of columns ``[start, end)`` among themselves: each pruned
    weight's error is written to ``errors`` (column ``start`` first) and spread over the later
    columns of the span. N:M groups are chosen here, on the columns as the sweep has updated them."""
    span = w[:, start:end]
    span_hinv = hinv[:, start:end, start:end]
    scale = pruned[:, start:end] / diag[:, start:end, None]
    keep = (~pruned[:, start:end]).to(span.dtype)
    for i in range(end - start):
        column = start + i
        if nm is not None and column % nm.m == 0:
            group = span[:, i : i + nm.m] ** 2 / diag[:, column : column + nm.m, None] ** 2
            lowest = torch.topk(group, nm.m - nm.n, dim=1, largest=False).indices
            pruned[:, column : column + nm.m].scatter_(1, lowest, True)
            scale[:, i : i + nm.m] = pruned[:, column : column + nm.m] / diag[:, column : column + nm.m, None]
            keep[:, i : i + nm.m] = ~pruned[:, column : column + nm.m]
        error = torch.mul(span[:, i], scale[:, i], out=errors[:, i])
        # The column's own update would zero its pruned weights only up to rounding: mask instead.
        span[:, i + 1 :].addcmul_(span_hinv[:, i, i + 1 :].unsqueeze(2), error.unsqueeze(1), value=-1.0)
        span[:, i].mul_(keep[:, i])


def _select_unstructured(
    w: torch.Tensor,
    diag: torch.Tensor,
    pruned: torch.Tensor,
    row_sparsity: torch.Tensor,
    start: int,
    end: int,
) -> None:
    """Mark, per row, the lowest-saliency weights of columns ``[start, end)`` for pruning
    (``w`` and ``pruned`` are ``[B, cols, rows]``)."""
    saliency = w[:, start:end].square().div_(diag[:, start:end, None].square())
    count = prune_count(row_sparsity, end) - prune_count(row_sparsity, start)
    pruned[:, start:end] = lowest_per_row(saliency, count)


class SparseGPT(StackedRowsMethod):
    """SparseGPT with inverse-Hessian factors cached per input group across plans."""

    name = "sparsegpt"

    def __init__(self, dampening: float = 0.01, mask_block: int = 128) -> None:
        super().__init__()
        self.dampening = dampening
        self.mask_block = mask_block

    def group_factors(self, stats: LinearStats) -> Factors:
        return (inverse_hessian_factor(stats.hessian, self.dampening),)

    def prune_stack(
        self, columns: torch.Tensor, factors: Factors, row_sparsity: torch.Tensor | None, nm: NMPattern | None
    ) -> None:
        (hinv,) = factors
        sparsegpt_prune_columns_(columns, hinv, row_sparsity, nm, self.mask_block)
