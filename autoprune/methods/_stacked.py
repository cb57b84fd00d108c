"""Methods that prune a layer's rows together with the rows of every layer reading the same input.

Second-order methods (SparseGPT, ADMM) derive their per-layer work from the input's Hessian, which
the layers of one input group share (q/k/v; gate/up). Stacking a group's rows lets one derived
factor serve all of them, and stacking groups of equal shape along a batch dimension lets one
batched loop serve every block: a whole LLaMA model takes four loops (q/k/v, o, gate/up, down).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections import defaultdict

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._base import LayerJob, PruningMethod
from autoprune.plan import NMPattern

#: What a method derives from one input group's statistics (stacked per batch, in the same order).
Factors = tuple[torch.Tensor, ...]
#: A batch of groups: (stacked rows, input width, N:M pattern or None for per-row sparsity).
BatchKey = tuple[int, int, str | None]


class StackedRowsMethod(PruningMethod):
    """Prunes stacked ``[B, cols, rows]`` float32 weights (transposed: a column, one input, is the
    unit of work of both sweeps) with factors derived once per input group and kept across plans."""

    def __init__(self) -> None:
        self._factors: dict[str, Factors] = {}
        #: Per batch shape, the groups of its last batch and their stacked factors: plan after
        #: plan, a batch holds the same groups, and stacking them anew (hundreds of MB for
        #: ``down_proj``) cost ~0.5 s. Keyed by batch, not factor shape: on LLaMA three batches
        #: (q/k/v, o, gate/up) have factors of one shape and evicted each other every plan.
        self._stacked: dict[BatchKey, tuple[tuple[str, ...], Factors]] = {}

    @abstractmethod
    def group_factors(self, stats: LinearStats) -> Factors:
        """What the method derives from one input group's statistics, independent of any plan."""

    @abstractmethod
    def prune_stack(
        self, columns: torch.Tensor, factors: Factors, row_sparsity: torch.Tensor | None, nm: NMPattern | None
    ) -> None:
        """Prune ``columns [B, cols, rows]`` in place, given each batch entry's stacked factors and
        either per-row sparsities ``[B, rows]`` or an N:M pattern."""

    def prune(self, jobs: list[LayerJob]) -> dict[str, torch.Tensor]:
        result = {job.name: job.weight for job in jobs if job.spec.is_dense}
        groups: dict[tuple[str, str | None], list[LayerJob]] = defaultdict(list)
        for job in jobs:
            if not job.spec.is_dense:
                pattern = str(job.spec.nm) if job.spec.nm is not None else None
                groups[(job.stats.group, pattern)].append(job)
        # Groups of one shape (stacked rows x input width) and pattern share a loop; the loops are
        # memory-bound, so shapes are not padded to a common height.
        batches: dict[BatchKey, list[list[LayerJob]]] = defaultdict(list)
        for (_, pattern), group in groups.items():
            rows = sum(job.weight.shape[0] for job in group)
            batches[(rows, group[0].weight.shape[1], pattern)].append(group)
        for key, batch in batches.items():
            result.update(self._prune_batch(key, batch))
        return result

    def _group_factors(self, stats: LinearStats) -> Factors:
        if stats.group not in self._factors:
            self._factors[stats.group] = self.group_factors(stats)
        return self._factors[stats.group]

    def _stacked_factors(
        self, key: BatchKey, stats: list[LinearStats], device: torch.device
    ) -> Factors:
        """The batch's factors on the weights' device (statistics load on the CPU)."""
        names = tuple(group.group for group in stats)
        cached = self._stacked.get(key)
        if cached is None or cached[0] != names or cached[1][0].device != device:
            per_group = [self._group_factors(group) for group in stats]
            stacked = tuple(torch.stack(parts).to(device) for parts in zip(*per_group, strict=True))
            cached = (names, stacked)
            self._stacked[key] = cached
        return cached[1]

    def _prune_batch(self, key: BatchKey, groups: list[list[LayerJob]]) -> dict[str, torch.Tensor]:
        """Stack each group's rows (every group of the batch has as many) and prune them at once.

        The stack is built column-major, as the sweeps want it, and each layer's result is a view
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
        factors = self._stacked_factors(key, [group[0].stats for group in groups], columns.device)
        pattern = key[2]
        nm = NMPattern.parse(pattern) if pattern is not None else None
        self.prune_stack(columns, factors, None if nm is not None else sparsity, nm)
        return {
            job.name: columns[index, :, offset : offset + job.weight.shape[0]].T.to(job.weight.dtype)
            for index, group in enumerate(groups)
            for job, offset in _offsets(group)
        }


def _offsets(group: list[LayerJob]) -> list[tuple[LayerJob, int]]:
    """Each layer of a group with the first of its rows in the group's stack."""
    starts = itertools.accumulate((job.weight.shape[0] for job in group), initial=0)
    return list(zip(group, starts))
