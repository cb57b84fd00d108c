"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and let the remaining weights of
each row absorb the error, through the inverse layer Hessian (optimal brain surgeon updates).

The core, :func:`sparsegpt_prune`, works on a batch of layers at once: the layers reading one input
share an inverse Hessian, so their rows are stacked, and blocks of equal shape are stacked along a
batch dimension. A whole model then takes one column loop per stacked shape (four on LLaMA: q/k/v,
o, gate/up, down) instead of one per layer.
"""

from __future__ import annotations

import itertools
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
    and out cost two strided copies of every weight, about a sixth of a SmolLM2 plan's prune.

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
    (``w`` and ``pruned`` are ``[B, cols, rows]``); ties go to the lower column, as a stable sort
    would order them.

    A row's cut-off is its ``count``-th smallest saliency, found by partial selection rather than
    a full sort, in the ``[B, cols, rows]`` layout as it is (a transposed copy cost more than it
    saved). Rows of one layer share a count, so selection runs once per run of equal counts and
    the comparison once for the whole batch.
    """
    saliency = w[:, start:end].square().div_(diag[:, start:end, None].square())
    count = prune_count(row_sparsity, end) - prune_count(row_sparsity, start)
    cutoff = torch.full(count.shape, -torch.inf, dtype=saliency.dtype, device=saliency.device)
    for index, first, last, k in _equal_runs(count):
        if k > 0:
            cutoff[index, first:last] = _kth_smallest(saliency[index, :, first:last], k)
    chosen = saliency <= cutoff.unsqueeze(1)
    # Counting in bytes is exact for a block under 256 columns and ~100x faster than in int64.
    counter = torch.uint8 if end - start < 256 else torch.int32
    over = chosen.view(torch.uint8).sum(dim=1, dtype=counter) > count
    # Where several saliencies tie at the cut-off, only the leftmost ones the count still needs go.
    for index, row in torch.nonzero(over).tolist():
        values, limit = saliency[index, :, row], cutoff[index, row]
        ties = values == limit
        wanted = count[index, row] - (values < limit).sum()
        chosen[index, :, row] = (values < limit) | (ties & (torch.cumsum(ties, dim=0) <= wanted))
    pruned[:, start:end] = chosen


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


class SparseGPT(PruningMethod):
    """SparseGPT with inverse-Hessian factors cached per input group across plans."""

    name = "sparsegpt"

    def __init__(self, dampening: float = 0.01, mask_block: int = 128) -> None:
        self.dampening = dampening
        self.mask_block = mask_block
        self._factors: dict[str, torch.Tensor] = {}
        #: Per batch shape, the groups of its last batch and their stacked factors: plan after
        #: plan, a batch holds the same groups, and stacking them anew (hundreds of MB for
        #: ``down_proj``) cost ~0.5 s. Keyed by batch, not factor shape: on LLaMA three batches
        #: (q/k/v, o, gate/up) have factors of one shape and evicted each other every plan.
        self._stacked: dict[tuple[int, int, str | None], tuple[tuple[str, ...], torch.Tensor]] = {}

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
        for key, batch in batches.items():
            result.update(self._prune_batch(key, batch))
        return result

    def _factor(self, stats: LinearStats) -> torch.Tensor:
        if stats.group not in self._factors:
            self._factors[stats.group] = inverse_hessian_factor(stats.hessian, self.dampening)
        return self._factors[stats.group]

    def _stacked_factors(
        self, key: tuple[int, int, str | None], stats: list[LinearStats], device: torch.device
    ) -> torch.Tensor:
        """The batch's factors on the weights' device (statistics load on the CPU)."""
        names = tuple(group.group for group in stats)
        cached = self._stacked.get(key)
        if cached is None or cached[0] != names or cached[1].device != device:
            cached = (names, torch.stack([self._factor(group) for group in stats]).to(device))
            self._stacked[key] = cached
        return cached[1]

    def _prune_batch(
        self, key: tuple[int, int, str | None], groups: list[list[LayerJob]]
    ) -> dict[str, torch.Tensor]:
        """Stack each group's rows (every group of the batch has as many) and prune them at once.

        The stack is built column-major, as the sweep wants it, and each layer's result is a view
        of it: ``nn.Linear`` reads a transposed view as fast as a contiguous weight (measured on
        SmolLM2's shapes), and whoever saves weights makes them contiguous.
        """
        rows = sum(job.weight.shape[0] for job in groups[0])
        first = groups[0][0].weight
        columns = first.new_empty(len(groups), first.shape[1], rows, dtype=torch.float32)
        sparsity = torch.zeros(len(groups), rows, device=columns.device)
        for index, group in enumerate(groups):
            for job, offset in _offsets(group):
                height = job.weight.shape[0]
                columns[index, :, offset : offset + height] = job.weight.T
                sparsity[index, offset : offset + height] = job.spec.sparsity
        hinv = self._stacked_factors(key, [group[0].stats for group in groups], columns.device)
        pattern = key[2]
        nm = NMPattern.parse(pattern) if pattern is not None else None
        sparsegpt_prune_columns_(
            columns,
            hinv,
            row_sparsity=None if nm is not None else sparsity,
            nm=nm,
            mask_block=self.mask_block,
        )
        return {
            job.name: columns[index, :, offset : offset + job.weight.shape[0]].T.to(job.weight.dtype)
            for index, group in enumerate(groups)
            for job, offset in _offsets(group)
        }


def _offsets(group: list[LayerJob]) -> list[tuple[LayerJob, int]]:
    """Each layer of a group with the first of its rows in the group's stack."""
    starts = itertools.accumulate((job.weight.shape[0] for job in group), initial=0)
    return list(zip(group, starts))
