"""Methods that prune by a fixed per-weight importance score (magnitude, Wanda)."""

from __future__ import annotations

from abc import abstractmethod

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._base import LayerJob, PruningMethod
from autoprune.methods._masks import keep_mask_from_order, nm_keep_mask, prune_count, prune_order


class ScoredPruningMethod(PruningMethod):
    """Scores depend only on the dense model, so each layer is scored and sorted once; a plan then
    costs one scatter per layer."""

    def __init__(self) -> None:
        self._orders: dict[str, torch.Tensor] = {}
        self._nm_masks: dict[tuple[str, int, int], torch.Tensor] = {}

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """Importance of each weight: the lowest go first."""

    def prune(self, jobs: list[LayerJob]) -> dict[str, torch.Tensor]:
        return {job.name: self._prune_one(job) for job in jobs}

    def _prune_one(self, job: LayerJob) -> torch.Tensor:
        spec, weight = job.spec, job.weight
        if spec.is_dense:
            return weight
        if spec.nm is not None:
            key = (job.name, spec.nm.n, spec.nm.m)
            if key not in self._nm_masks:
                self._nm_masks[key] = nm_keep_mask(
                    self.scores(weight, job.stats), spec.nm.n, spec.nm.m
                )
            return weight * self._nm_masks[key]
        if job.name not in self._orders:
            self._orders[job.name] = prune_order(self.scores(weight, job.stats))
        keep = keep_mask_from_order(self._orders[job.name], prune_count(spec.sparsity, weight.shape[1]))
        return weight * keep
