"""Depth pruning: whole decoder blocks removed, least influential first (ShortGPT's order).

``depth`` searches only how many blocks go; ``depth_layerwise`` adds that count to the layer-wise
space, where the target still covers the removed blocks: what depth takes, the remaining layers
need not, and the kept layers are projected onto what is left of the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.distributions import BaseDistribution, IntDistribution

from autoprune.plan import Plan
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext
from search_spaces._layerwise import LayerwiseSpace

N_REMOVED = "n_removed"
#: In ``depth_layerwise``, at most this share of the blocks is removed: depth is a complement to
#: unstructured sparsity there, and beyond a quarter of the blocks quality collapses.
MAX_DEPTH_SHARE = 0.25


class DepthSpace(SearchSpace):
    """How many of the least influential blocks to remove (up to the range's upper end)."""

    name = "depth"
    has_target = False
    unstructured = False

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return {N_REMOVED: IntDistribution(0, self._max_removed(ctx))}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        return Plan(method=ctx.method, removed_blocks=ctx.least_influential_blocks(params[N_REMOVED]))

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """ShortGPT at the block counts nearest each target."""
        counts = sorted({min(max(round(t * ctx.num_blocks), 1), self._max_removed(ctx)) for t in targets})
        return {f"shortgpt@{n}": {N_REMOVED: n} for n in counts}

    @staticmethod
    def _max_removed(ctx: SpaceContext) -> int:
        return min(ctx.num_blocks - 1, max(1, int(ctx.sparsity_range[1] * ctx.num_blocks)))


class DepthLayerwiseSpace(LayerwiseSpace):
    """The layer-wise space plus ``n_removed`` blocks, all within the target's budget."""

    name = "depth_layerwise"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        most = max(1, int(MAX_DEPTH_SHARE * ctx.num_blocks))
        return {**super().distributions(ctx), N_REMOVED: IntDistribution(0, most)}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        # Never remove more than the target: the kept layers would need negative sparsity.
        count = min(params[N_REMOVED], int(params[TARGET] * ctx.num_blocks))
        return self.allocate(params, ctx, ctx.least_influential_blocks(count))

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return {label: {**p, N_REMOVED: 0} for label, p in super().baselines(ctx, targets).items()}

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return {label: {**p, N_REMOVED: 0} for label, p in super().seeds(ctx, targets).items()}
