"""``nm``: per block, dense, 4:8 or 2:4 — the patterns sparse tensor cores accelerate.

Sizes here are what the choices make them (at most half the weights go), so the space has no
target; it searches which blocks can afford a semi-structured pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution

from autoprune.errors import AutopruneError
from autoprune.plan import LayerSpec, NMPattern, Plan
from search_spaces._base import Params, SearchSpace, SpaceContext

DENSE = "dense"
NM_CHOICES = (DENSE, "4:8", "2:4")


def nm_param(block: int) -> str:
    return f"nm_{block}"


class NMSpace(SearchSpace):
    """One categorical choice per decoder block, applied to all its linear layers."""

    name = "nm"
    has_target = False
    unstructured = False

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        widest_m = max(NMPattern.parse(choice).m for choice in NM_CHOICES if choice != DENSE)
        odd = [name for name, info in ctx.layers.items() if info.cols % widest_m]
        if odd:
            raise AutopruneError(f"space 'nm' needs in_features divisible by {widest_m}: {odd[0]}")
        return {nm_param(block): CategoricalDistribution(NM_CHOICES) for block in range(ctx.num_blocks)}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        specs = {
            choice: LayerSpec() if choice == DENSE else LayerSpec(nm=NMPattern.parse(choice))
            for choice in NM_CHOICES
        }
        layers = {name: specs[params[nm_param(info.block)]] for name, info in ctx.layers.items()}
        return Plan(method=ctx.method, layers=layers)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Every block at 4:8, and every block at 2:4 (the uniform semi-structured baselines)."""
        return {
            f"uniform-{choice}": {nm_param(block): choice for block in range(ctx.num_blocks)}
            for choice in NM_CHOICES
            if choice != DENSE
        }
