"""Magnitude pruning: remove the smallest weights of each row. The data-free baseline."""

from __future__ import annotations

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._scored import ScoredPruningMethod


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


class Magnitude(ScoredPruningMethod):
    name = "magnitude"

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        return magnitude_scores(weight)
