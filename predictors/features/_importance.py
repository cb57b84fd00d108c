"""How much of each layer's importance a plan removes, read from tables built once per model.

Sparsity alone says how many weights go, not which: 60% of a block whose Wanda scores are spread
evenly costs more than 60% of one whose mass sits in a few weights. Wanda prunes the lowest scores
of every row, so the score mass it removes at ``k`` weights per row is a prefix sum of the row-sorted
scores; summing the sorted rows column-wise once per layer turns every later question ("how much
mass goes at this sparsity?") into one table lookup, whatever the plan.
"""

from __future__ import annotations

import numpy as np
import torch

from autoprune.calibration import CalibrationStats
from autoprune.methods import nm_keep_mask, prune_count, wanda_scores
from autoprune.models import LoadedModel
from autoprune.plan import LayerSpec


class ImportanceTable:
    """Per linear layer, the share of its Wanda score mass removed at every per-row prune count
    (and, computed on first use, under every N:M pattern asked for)."""

    def __init__(self, loaded: LoadedModel, stats: CalibrationStats, names: list[str]) -> None:
        self._loaded, self._stats = loaded, stats
        self._prefix: dict[str, np.ndarray] = {}
        self._nm: dict[tuple[str, int, int], float] = {}
        with torch.no_grad():
            for name in names:
                scores = self._scores(name)
                column_mass = torch.sort(scores, dim=1).values.sum(dim=0, dtype=torch.float64)
                prefix = torch.cat([column_mass.new_zeros(1), torch.cumsum(column_mass, 0)])
                self._prefix[name] = (prefix / prefix[-1].clamp_min(1e-30)).numpy()

    def removed_share(self, name: str, spec: LayerSpec) -> float:
        """Share of layer ``name``'s Wanda score mass that ``spec`` removes."""
        if spec.nm is not None:
            key = (name, spec.nm.n, spec.nm.m)
            if key not in self._nm:
                with torch.no_grad():
                    scores = self._scores(name).double()
                    kept = nm_keep_mask(scores, spec.nm.n, spec.nm.m)
                    self._nm[key] = float(1.0 - scores[kept].sum() / scores.sum().clamp_min(1e-30))
            return self._nm[key]
        prefix = self._prefix[name]
        return float(prefix[prune_count(spec.sparsity, len(prefix) - 1)])

    def _scores(self, name: str) -> torch.Tensor:
        weight = self._loaded.model.get_submodule(name).weight.detach().float().cpu()
        return wanda_scores(weight, self._stats.layer(name).act_norm)
