"""``uniform``: one number, the target; every layer at it (on the exact budget)."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.distributions import BaseDistribution

from autoprune.plan import Plan
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext
from search_spaces._budget import project_to_budget


class UniformSpace(SearchSpace):
    """The baseline family: searching it only picks sizes, which makes it the yardstick."""

    name = "uniform"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return {TARGET: ctx.target_distribution()}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        target = params[TARGET]
        return project_to_budget({name: target for name in ctx.layers}, ctx, target)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return {f"uniform@{t:.2f}": {TARGET: t} for t in targets}
