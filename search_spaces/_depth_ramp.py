"""``depth_ramp``: sparsity rising (or falling) linearly with depth around the target.

Later blocks of LLMs usually tolerate more pruning than early ones; one slope captures most of that
at the price of a single parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.distributions import BaseDistribution, FloatDistribution

from autoprune.plan import Plan
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext
from search_spaces._budget import project_to_budget

RAMP = "ramp"
MAX_RAMP = 0.4


class DepthRampSpace(SearchSpace):
    """Block ``i`` of ``B`` at ``target + ramp * (i / (B - 1) - 1/2)`` before projection."""

    name = "depth_ramp"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return {TARGET: ctx.target_distribution(), RAMP: FloatDistribution(-MAX_RAMP, MAX_RAMP)}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        target, ramp = params[TARGET], params[RAMP]
        last = max(ctx.num_blocks - 1, 1)
        raw = {
            name: target + ramp * (info.block / last - 0.5) for name, info in ctx.layers.items()
        }
        return project_to_budget(raw, ctx, target)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return {f"uniform@{t:.2f}": {TARGET: t, RAMP: 0.0} for t in targets}
