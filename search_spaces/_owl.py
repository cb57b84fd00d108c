"""``owl``: OWL's outlier-driven allocation with its two hyperparameters searched.

OWL fixes ``M`` (outlier threshold) and ``lambda`` (spread) by hand per model; here they are
parameters beside the target. ``M`` is categorical over :data:`OWL_THRESHOLDS` because the outlier
ratios are computed once per threshold, not per trial. ``lambda = 0`` is uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from autoprune.allocation import owl_block_sparsities
from autoprune.plan import Plan
from search_spaces._base import (
    OWL_DEFAULT_LAMBDA,
    OWL_DEFAULT_M,
    TARGET,
    Params,
    SearchSpace,
    SpaceContext,
)
from search_spaces._budget import project_to_budget

OWL_M = "owl_m"
OWL_LAMBDA = "owl_lambda"
MAX_LAMBDA = 0.2


class OWLSpace(SearchSpace):
    """Target, ``M`` and ``lambda``: three numbers, so samplers converge in few trials."""

    name = "owl"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return {
            TARGET: ctx.target_distribution(),
            OWL_M: CategoricalDistribution(tuple(sorted(ctx.outlier_ratios))),
            OWL_LAMBDA: FloatDistribution(0.0, MAX_LAMBDA),
        }

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        target = params[TARGET]
        ratios = torch.tensor(ctx.outlier_ratios[float(params[OWL_M])], dtype=torch.float64)
        per_block = owl_block_sparsities(ratios, target, params[OWL_LAMBDA])
        raw = {name: per_block[info.block] for name, info in ctx.layers.items()}
        return project_to_budget(raw, ctx, target)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        result = {}
        for t in targets:
            result[f"uniform@{t:.2f}"] = {TARGET: t, OWL_M: OWL_DEFAULT_M, OWL_LAMBDA: 0.0}
            result[f"owl@{t:.2f}"] = {TARGET: t, OWL_M: OWL_DEFAULT_M, OWL_LAMBDA: OWL_DEFAULT_LAMBDA}
        return result
