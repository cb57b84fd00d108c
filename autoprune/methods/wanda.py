"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, per output row, without weight update."""

from __future__ import annotations

import torch

from autoprune.calibration import LinearStats
from autoprune.methods._scored import ScoredPruningMethod


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Weight magnitude times the L2 norm of the input channel it multiplies. Statistics load on
    the CPU; the norms follow the weight, which lives on the compute device."""
    return weight.abs() * act_norm.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)


class Wanda(ScoredPruningMethod):
    name = "wanda"

    def scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        return wanda_scores(weight, stats.act_norm)
