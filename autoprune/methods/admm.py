"""ADMM pruning (Boža, 2024, "Fast and Effective Weight Update for Pruned Large Language Models"):
solve each layer's reconstruction problem for its mask by the alternating direction method of
multipliers, while the mask grows gradually to its target.

Why it beats SparseGPT on the same statistics: SparseGPT decides every weight's fate in one
left-to-right sweep, and a pruned weight's error is absorbed only by the columns to its right. Here
the layer's least-squares problem ``min ||X (W - W')||^2`` subject to the mask is solved again at
every iteration by all remaining weights, and the mask itself is re-chosen from the current
solution (Wanda's score ``|w| * ||x||``, on weights that have already absorbed the pruning so far)
as it tightens along a cubic schedule, so early choices can be undone. It costs many times a
SparseGPT prune, which is why search trials use SparseGPT and ``autoprune refine --method admm``
uses this (measured in ``experiments/README.md``, section ``refine_front.py``).

The problem is solved in input-normalised coordinates (the Hessian scaled to a unit diagonal), where
one penalty and one dampening fit every layer. Each iteration costs one ``cols x cols`` product
per row stack; the inverse it multiplies by depends only on the statistics, so it is computed once
per input group and kept across plans. Rows are independent given the statistics, so a layer's
result depends only on its own weight, statistics and prune count (what ``autoprune refine``
relies on to re-prune only the layers a candidate changes).
"""

from __future__ import annotations

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._masks import lowest_per_row, nm_keep_mask, prune_count
from autoprune.methods._stacked import Factors, StackedRowsMethod
from autoprune.plan import NMPattern


def admm_factors(
    hessian: torch.Tensor, dampening: float = 0.1, penalty: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, gram, inverse)`` of one input group: the per-input scale that gives the Hessian a
    unit diagonal (inputs that never fired keep scale 1), the scaled Hessian dampened by
    ``dampening`` times its mean diagonal (a pull towards the dense weights that keeps
    ill-conditioned inputs from exploding), and the inverse of ``gram + penalty * I`` that every
    ADMM iteration multiplies by."""
    h = hessian.to(torch.float64)
    diag = torch.diagonal(h)
    scale = torch.where(diag > 0, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    gram = h / scale[:, None] / scale[None, :]
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    gram += dampening * torch.mean(torch.diagonal(gram)) * eye
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram + penalty * eye))
    return scale.to(torch.float32), gram.to(torch.float32), inverse.to(torch.float32)


@torch.no_grad()
def admm_prune_columns_(
    columns: torch.Tensor,
    factors: Factors,
    row_sparsity: torch.Tensor | None = None,
    nm: NMPattern | None = None,
    iterations: int = 20,
    mask_iterations: int = 15,
    penalty: float = 1.0,
) -> None:
    """Prune contiguous float32 ``columns [B, cols, rows]`` (transposed weights, as
    :func:`~autoprune.methods.sparsegpt.sparsegpt_prune_columns_` takes them) in place, with each
    batch entry's stacked :func:`admm_factors` ``(scale, gram, inverse)`` (``penalty`` must be the
    one they were built with).

    Unstructured (``row_sparsity [B, rows]``): over the first ``mask_iterations`` iterations each
    row's pruned share grows as ``s * (1 - (1 - t)^3)`` to exactly ``round(s * cols)`` weights, then
    the mask stays and the remaining iterations settle the weights. N:M (``nm``): each group of
    ``m`` inputs keeps its ``n`` best, re-chosen over the same iterations.
    """
    if (row_sparsity is None) == (nm is None):
        raise ValueError("give exactly one of row_sparsity and nm")
    if not 0 < mask_iterations <= iterations:
        raise ValueError(f"need 0 < mask_iterations <= iterations, got {mask_iterations}, {iterations}")
    scale, gram, inverse = factors
    batch, cols, rows = columns.shape
    if nm is not None and cols % nm.m:
        raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}, got {cols}")
    weight = columns.mul(scale.unsqueeze(2))
    # (gram + penalty I)^-1 gram W, the fixed part of every weight update.
    anchored = torch.bmm(inverse, torch.bmm(gram, weight))
    dual = torch.zeros_like(weight)
    signed = torch.empty_like(weight)
    magnitude = torch.empty_like(weight)
    keep = torch.ones_like(weight, dtype=torch.bool)
    # Every tensor of the loop is allocated once above: the updates are memory-bound, and fresh
    # tensors of a batch's size cost more in page faults than the arithmetic itself.
    for step in range(iterations):
        # In scaled form: Z = (W + U) * mask, U <- U + W - Z, W <- (G + pI)^-1 (G W0 + p (Z - U)).
        # With S = W + U, the new U is S off the mask and Z - U = S - 2 U: S with its pruned signs
        # flipped.
        combined = weight.add_(dual)
        if step < mask_iterations:
            keep = _keep_mask(torch.abs(combined, out=magnitude), step, mask_iterations, row_sparsity, nm)
        torch.mul(combined, keep.logical_not(), out=dual)
        torch.sub(combined, dual, alpha=2.0, out=signed)
        torch.baddbmm(anchored, inverse, signed, alpha=penalty, out=weight)
    columns.copy_(weight.add_(dual).mul_(keep).div_(scale.unsqueeze(2)))


def _keep_mask(
    score: torch.Tensor,
    step: int,
    mask_iterations: int,
    row_sparsity: torch.Tensor | None,
    nm: NMPattern | None,
) -> torch.Tensor:
    """The weights kept at ``step``: each N:M group's best, or all but each row's lowest scores,
    as many as the cubic schedule prunes by then (all of its share at the last mask iteration)."""
    batch, cols, rows = score.shape
    if nm is not None:
        flat = score.transpose(1, 2).reshape(batch * rows, cols)
        return nm_keep_mask(flat, nm.n, nm.m).reshape(batch, rows, cols).transpose(1, 2)
    grown = 1.0 - (1.0 - (step + 1) / mask_iterations) ** 3
    return ~lowest_per_row(score, prune_count(row_sparsity * grown, cols))


class ADMM(StackedRowsMethod):
    """ADMM weight updates with a gradually grown mask, factors cached per input group."""

    name = "admm"

    def __init__(
        self, dampening: float = 0.1, penalty: float = 1.0, iterations: int = 20, mask_iterations: int = 15
    ) -> None:
        super().__init__()
        self.dampening = dampening
        self.penalty = penalty
        self.iterations = iterations
        self.mask_iterations = mask_iterations

    def group_factors(self, stats: LinearStats) -> Factors:
        return admm_factors(stats.hessian, self.dampening, self.penalty)

    def prune_stack(
        self, columns: torch.Tensor, factors: Factors, row_sparsity: torch.Tensor | None, nm: NMPattern | None
    ) -> None:
        admm_prune_columns_(
            columns, factors, row_sparsity, nm, self.iterations, self.mask_iterations, self.penalty
        )
