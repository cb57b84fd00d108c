"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and let the remaining weights of
each row absorb the error, through the inverse layer Hessian (optimal brain surgeon updates).

The core, :func:`sparsegpt_prune`, works on a batch of layers at once: the layers reading one input
share an inverse Hessian, so their rows are stacked, and blocks of equal width are stacked along a
batch dimension. A whole model then takes one column loop per input width instead of one per layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._base import LayerJob, PruningMethod
from autoprune.methods._masks import prune_count
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
    ``[B, cols, cols]``.

    Unstructured (``row_sparsity [B, rows]``): every ``mask_block`` columns, each row drops the
    lowest ``w^2 / [H^-1]_jj^2`` among the next columns, with per-block counts rounded cumulatively
    so every row loses exactly ``round(s * cols)`` weights. N:M (``nm``): each group of ``m``
    columns keeps its ``n`` best. Updates are applied lazily every ``update_block`` columns, which
    is exact and keeps the rank-1 work small.
    """
    if (row_sparsity is None) == (nm is None):
        raise ValueError("give exactly one of row_sparsity and nm")
    batch, rows, cols = weight.shape
    if nm is not None and (cols % nm.m or update_block % nm.m):
        raise ValueError(f"N:M {nm} needs in_features divisible by {nm.m}, got {cols}")
    # Columns are the unit of work, so they are stored contiguously: [B, cols, rows].
    w = weight.to(torch.float32).transpose(1, 2).contiguous()
    pruned = torch.zeros_like(w, dtype=torch.bool)
    diag = torch.diagonal(hinv, dim1=1, dim2=2)
    for start in range(0, cols, update_block):
        end = min(start + update_block, cols)
        if row_sparsity is not None and start % mask_block == 0:
            _select_unstructured(w, diag, pruned, row_sparsity, start, min(start + mask_block, cols))
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[:, start:end, start:end]
        for i in range(end - start):
            column = start + i
            if nm is not None and column % nm.m == 0:
                group = w_block[:, i : i + nm.m] ** 2 / diag[:, column : column + nm.m, None] ** 2
                lowest = torch.topk(group, nm.m - nm.n, dim=1, largest=False).indices
                pruned[:, column : column + nm.m].scatter_(1, lowest, True)
            values = w_block[:, i]
            kept = values.masked_fill(pruned[:, column], 0.0)
            error = (values - kept) / hinv_block[:, i, i].unsqueeze(1)
            w_block[:, i:].addcmul_(hinv_block[:, i, i:].unsqueeze(2), error.unsqueeze(1), value=-1.0)
            w_block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w_block
        w[:, end:] -= torch.bmm(hinv[:, start:end, end:].transpose(1, 2), errors)
    w.masked_fill_(pruned, 0.0)
    return w.transpose(1, 2).contiguous().to(weight.dtype)


def _select_unstructured(
    w: torch.Tensor,
    diag: torch.Tensor,
    pruned: torch.Tensor,
    row_sparsity: torch.Tensor,
    start: int,
    end: int,
) -> None:
    """Mark, per row, the lowest-saliency weights of columns ``[start, end)`` for pruning
    (``w`` and ``pruned`` are ``[B, cols, rows]``); ties go to the lower column, as a stable sort
    would order them.

    A row's cut-off is its ``count``-th smallest saliency, found by selection rather than a full
    sort (on a SmolLM2 plan, selection fell from ~5.6 to ~3.4 CPU-seconds; the masks are the same).
    Rows of one layer share a count, so selection runs once per run of equal counts and the
    comparison once for the whole batch.
    """
    # Rows x block columns, contiguous: selection reads along the last dimension.
    saliency = (w[:, start:end] ** 2 / diag[:, start:end, None] ** 2).transpose(1, 2).contiguous()
    count = prune_count(row_sparsity, end) - prune_count(row_sparsity, start)
    cutoff = torch.full(count.shape, -torch.inf, dtype=saliency.dtype, device=saliency.device)
    for index, first, last, k in _equal_runs(count):
        if k > 0:
            cutoff[index, first:last] = torch.kthvalue(saliency[index, first:last], k, dim=1).values
    chosen = saliency <= cutoff.unsqueeze(2)
    # Where several saliencies tie at the cut-off, only the leftmost ones the count still needs go.
    for index, row in torch.nonzero(chosen.sum(dim=2) > count).tolist():
        values, limit = saliency[index, row], cutoff[index, row]
        ties = values == limit
        wanted = count[index, row] - (values < limit).sum()
        chosen[index, row] = (values < limit) | (ties & (torch.cumsum(ties, dim=0) <= wanted))
    pruned[:, start:end] = chosen.transpose(1, 2)


def _equal_runs(count: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(batch index, first row, end row, count)`` for every run of rows with one count."""
    changes = count[:, 1:] != count[:, :-1]
    runs = []
    for index in range(count.shape[0]):
        cuts = [0, *(torch.nonzero(changes[index]).flatten() + 1).tolist(), count.shape[1]]
        for first, last, k in zip(cuts[:-1], cuts[1:], count[index, cuts[:-1]].tolist(), strict=True):
            runs.append((index, first, last, k))
    return runs


class SparseGPT(PruningMethod):
    """SparseGPT with inverse-Hessian factors cached per input group across plans."""

    name = "sparsegpt"

    def __init__(self, dampening: float = 0.01, mask_block: int = 128) -> None:
        self.dampening = dampening
        self.mask_block = mask_block
        self._factors: dict[str, torch.Tensor] = {}
        #: The stacked factors of the last batch of each shape: plan after plan, a batch holds the
        #: same groups, and stacking them anew (hundreds of MB for ``down_proj``) cost ~0.5 s.
        self._stacked: dict[tuple[str, ...], torch.Tensor] = {}

    def prune(self, jobs: list[LayerJob]) -> dict[str, torch.Tensor]:
        result = {job.name: job.weight for job in jobs if job.spec.is_dense}
        groups: dict[tuple[str, str | None], list[LayerJob]] = defaultdict(list)
        for job in jobs:
            if not job.spec.is_dense:
                pattern = str(job.spec.nm) if job.spec.nm is not None else None
                groups[(job.stats.group, pattern)].append(job)
        # Groups of one shape (stacked rows x input width) and pattern share a column loop; the
        # loop is memory-bound, so shapes are not padded to a common height.
        batches: dict[tuple[int, int, str | None], list[list[LayerJob]]] = defaultdict(list)
        for (_, pattern), group in groups.items():
            rows = sum(job.weight.shape[0] for job in group)
            batches[(rows, group[0].weight.shape[1], pattern)].append(group)
        for (_, _, pattern), batch in batches.items():
            result.update(self._prune_batch(batch, pattern))
        return result

    def _factor(self, stats: LinearStats) -> torch.Tensor:
        if stats.group not in self._factors:
            self._factors[stats.group] = inverse_hessian_factor(stats.hessian, self.dampening)
        return self._factors[stats.group]

    def _stacked_factors(self, stats: list[LinearStats]) -> torch.Tensor:
        key = tuple(group.group for group in stats)
        if key not in self._stacked:
            shape = self._factor(stats[0]).shape
            self._stacked = {k: v for k, v in self._stacked.items() if v.shape[1:] != shape}
            self._stacked[key] = torch.stack([self._factor(group) for group in stats])
        return self._stacked[key]

    def _prune_batch(self, groups: list[list[LayerJob]], pattern: str | None) -> dict[str, torch.Tensor]:
        """Stack each group's rows (every group of the batch has as many) and prune them at once."""
        rows = sum(job.weight.shape[0] for job in groups[0])
        first = groups[0][0].weight
        weight = first.new_zeros(len(groups), rows, first.shape[1], dtype=torch.float32)
        sparsity = torch.zeros(len(groups), rows)
        for index, group in enumerate(groups):
            offset = 0
            for job in group:
                height = job.weight.shape[0]
                weight[index, offset : offset + height] = job.weight
                sparsity[index, offset : offset + height] = job.spec.sparsity
                offset += height
        hinv = self._stacked_factors([group[0].stats for group in groups])
        nm = NMPattern.parse(pattern) if pattern is not None else None
        pruned = sparsegpt_prune(
            weight,
            hinv,
            row_sparsity=None if nm is not None else sparsity,
            nm=nm,
            mask_block=self.mask_block,
        )
        result = {}
        for index, group in enumerate(groups):
            offset = 0
            for job in group:
                height = job.weight.shape[0]
                result[job.name] = pruned[index, offset : offset + height].to(job.weight.dtype)
                offset += height
        return result
