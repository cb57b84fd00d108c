"""Choosing which heads / channels a block keeps, and correcting the layer that reads them.

Everything here is a pure tensor function of one consuming layer (``o_proj`` for heads,
``down_proj`` for FFN channels): its weight ``W`` (out x in), and the calibration statistics of its
input (per-channel sum of squares, X^T X). Input columns come in *units* (a head is ``head_dim``
consecutive columns, an FFN channel is one), units come in *groups* (a KV group's query heads; the
FFN is one group), and a selection keeps ``groups_kept`` whole groups with ``units_per_group``
units in each, which is exactly what grouped-query attention needs to stay a standard layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Damping added to X^T X before it is inverted, as a fraction of its mean diagonal (SparseGPT's).
DAMPING = 0.01


@dataclass(frozen=True)
class UnitLayout:
    """How the input columns of a consuming layer split into units and groups."""

    unit_size: int
    n_groups: int
    units_per_group: int

    @property
    def n_units(self) -> int:
        return self.n_groups * self.units_per_group

    def columns(self, units: list[int]) -> list[int]:
        """Input column indices of ``units``, in order."""
        return [unit * self.unit_size + offset for unit in units for offset in range(self.unit_size)]


def activation_scores(sq_norm: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """Minitron's importance per unit: the L2 norm of the unit's activations over all calibration
    tokens (the cache holds per-channel sums of squares, so a unit's score is their root-sum)."""
    return sq_norm.double().clamp_min(0).view(layout.n_units, layout.unit_size).sum(1).sqrt()


def weighted_scores(sq_norm: torch.Tensor, weight: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """Per unit, sqrt(sum_j ||X_j||^2 ||W_:,j||^2): the output energy the unit's columns carry,
    FLAP's fluctuation metric with the mean taken as zero (the cache holds no per-channel means)."""
    energy = sq_norm.double().clamp_min(0) * weight.double().pow(2).sum(0)
    return energy.view(layout.n_units, layout.unit_size).sum(1).sqrt()


def select_by_scores(
    scores: torch.Tensor, layout: UnitLayout, groups_kept: int, units_per_group: int
) -> list[int]:
    """Keep the ``groups_kept`` groups of highest total score and, inside each, the
    ``units_per_group`` highest-scoring units. Ties go to the lower index (deterministic)."""
    per_group = scores.view(layout.n_groups, layout.units_per_group)
    groups = _top(per_group.sum(1), groups_kept)
    kept = []
    for group in groups:
        inside = _top(per_group[group], units_per_group)
        kept.extend(group * layout.units_per_group + unit for unit in inside)
    return sorted(kept)


def _top(values: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return sorted(order[:k])


def damped(xtx: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """X^T X + damping * mean(diag) I, in float64 (invertible even for dead channels)."""
    h = xtx.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean().clamp_min(1e-12))
    return h


def damped_inverse(xtx: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The inverse of :func:`damped`."""
    return torch.cholesky_inverse(torch.linalg.cholesky(damped(xtx, damping)))


def obs_select(
    weight: torch.Tensor, xtx: torch.Tensor, layout: UnitLayout, groups_kept: int, units_per_group: int
) -> list[int]:
    """Greedy structured OBS (ZipLM, SlimGPT): repeatedly remove the group (first) or unit (then)
    whose removal, with the optimal update of the remaining columns, adds least to
    ||X W^T - X W'^T||^2, updating W and the inverse Hessian after every removal."""
    w = weight.double().clone()
    hinv = damped_inverse(xtx)
    alive_groups = list(range(layout.n_groups))
    while len(alive_groups) > groups_kept:
        costs = [
            _obs_cost(w, hinv, layout.columns(_group_units(group, layout))) for group in alive_groups
        ]
        victim = alive_groups[min(range(len(costs)), key=lambda i: (costs[i], i))]
        w, hinv = _obs_remove(w, hinv, layout.columns(_group_units(victim, layout)))
        alive_groups.remove(victim)
    alive = {group: _group_units(group, layout) for group in alive_groups}
    while any(len(units) > units_per_group for units in alive.values()):
        candidates = [u for units in alive.values() if len(units) > units_per_group for u in units]
        costs = _unit_costs(w, hinv, candidates, layout)
        victim = candidates[min(range(len(candidates)), key=lambda i: (float(costs[i]), i))]
        w, hinv = _obs_remove(w, hinv, layout.columns([victim]))
        alive[victim // layout.units_per_group].remove(victim)
    return sorted(u for units in alive.values() for u in units)


def _group_units(group: int, layout: UnitLayout) -> list[int]:
    return list(range(group * layout.units_per_group, (group + 1) * layout.units_per_group))


def _obs_cost(w: torch.Tensor, hinv: torch.Tensor, cols: list[int]) -> float:
    """tr(W_S (Hinv_SS)^-1 W_S^T): the loss increase of removing columns ``cols`` optimally."""
    w_s = w[:, cols]
    return float((w_s * torch.linalg.solve(hinv[cols][:, cols], w_s.T).T).sum())


def _unit_costs(w: torch.Tensor, hinv: torch.Tensor, units: list[int], layout: UnitLayout) -> torch.Tensor:
    """:func:`_obs_cost` of every unit in ``units`` at once (batched solves)."""
    cols = torch.tensor(units).unsqueeze(1) * layout.unit_size + torch.arange(layout.unit_size)
    blocks = hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (n, size, size)
    w_s = w[:, cols].permute(1, 2, 0)  # (n, size, out)
    return (w_s * torch.linalg.solve(blocks, w_s)).sum(dim=(1, 2))


def _obs_remove(w: torch.Tensor, hinv: torch.Tensor, cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns ``cols`` of W with the OBS update of the others, and drop them from Hinv."""
    inv_block = torch.linalg.inv(hinv[cols][:, cols])
    rows = hinv[cols]  # (s, in)
    w = w - w[:, cols] @ inv_block @ rows
    hinv = hinv - rows.T @ inv_block @ rows
    w[:, cols] = 0.0
    return w, hinv


def least_squares_correction(
    weight: torch.Tensor, xtx: torch.Tensor, kept_columns: list[int], damping: float = DAMPING
) -> torch.Tensor:
    """The weight on the kept input columns that best reproduces the dense layer's output:
    argmin_V ||X W^T - X_K V^T||^2 = W H_{:,K} H_KK^-1 with H = X^T X (damped). Returns
    (out x len(kept_columns)) in ``weight``'s dtype."""
    h = damped(xtx, damping)
    kept = torch.tensor(kept_columns)
    is_kept = torch.zeros(h.shape[0], dtype=torch.bool)
    is_kept[kept] = True
    removed = (~is_kept).nonzero().squeeze(1)
    w = weight.double()
    # H_KK V^T = H_K: W^T = H_KK W_K^T + H_KR W_R^T, so V^T = W_K^T + H_KK^-1 H_KR W_R^T: the
    # right-hand side costs the removed columns only.
    rhs = h[kept][:, removed] @ w[:, removed].T  # (k, out)
    update = torch.cholesky_solve(rhs, torch.linalg.cholesky(h[kept][:, kept]))  # H_KK is SPD
    return (w[:, kept] + update.T).to(weight.dtype).contiguous()
