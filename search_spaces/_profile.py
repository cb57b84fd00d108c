"""``profile``: an allocation's shape in a dozen numbers, a depth profile and per-projection offsets.

``layerwise`` gives every block an offset of its own: dozens of parameters, more than a search of a
few dozen trials can fit, so its fronts are won by its seeded ramps. Here the blocks' offsets
follow a piecewise-linear curve through :data:`KNOTS` evenly spaced depths, less a share of each
block's influence (how much the block changes its input), and each projection keeps its own
offset, the same in every block: on grouped-query attention the narrow key and value projections,
whose every weight serves several query heads, take sparsity very differently from the others
(experiments/README.md). What a handful of numbers cannot say, per-layer detail, is ``refine``'s
work. Like every offset space, the result is projected onto the target's exact budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution

from autoprune.plan import Plan
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext
from search_spaces._budget import project_to_budget
from search_spaces._layerwise import MAX_OFFSET, SEED_SLOPES, projection_distributions, projection_param

#: Depths (first block to last, evenly spaced) whose offsets the curve passes through.
KNOTS = 4
#: How much sparsity the most influential block is spared, at most (the others in proportion).
SPARE = "spare_influential"
#: The key/value projections' offset of the grouped-query seeds.
KV_SEED_OFFSET = -0.2
KV_PROJECTIONS = ("k_proj", "v_proj")


def knot_param(knot: int) -> str:
    return f"depth_{knot}"


class ProfileSpace(SearchSpace):
    """``target``, ``depth_0`` ... ``depth_3``, ``spare_influential`` and one ``offset_<projection>``
    per projection."""

    name = "profile"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        depth = FloatDistribution(-MAX_OFFSET, MAX_OFFSET)
        return {
            TARGET: ctx.target_distribution(),
            **{knot_param(knot): depth for knot in range(KNOTS)},
            SPARE: FloatDistribution(0.0, MAX_OFFSET),
            **projection_distributions(ctx),
        }

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        target = params[TARGET]
        blocks = block_offsets(params, ctx)
        raw = {
            name: target + blocks[info.block] + params[projection_param(info.projection)]
            for name, info in ctx.layers.items()
        }
        return project_to_budget(raw, ctx, target)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Uniform sparsity at each target (every offset zero)."""
        return {f"uniform@{t:.2f}": _params(ctx, t, [0.0] * KNOTS, 0.0, {}) for t in targets}

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Depth ramps sparing influential blocks (``layerwise``'s seeds, in this space's terms) and,
        on a grouped-query model, the same ramps with denser key and value projections."""
        grouped = ctx.dims is not None and ctx.dims.heads_per_group > 1
        denser_kv = {name: KV_SEED_OFFSET for name in KV_PROJECTIONS if name in ctx.projections}
        result = {}
        for t in targets:
            for slope in SEED_SLOPES:
                knots = [slope * (knot / (KNOTS - 1) - 0.5) for knot in range(KNOTS)]
                result[f"ramp{slope:g}@{t:.2f}"] = _params(ctx, t, knots, MAX_OFFSET, {})
                if grouped and denser_kv:
                    result[f"ramp{slope:g}+kv@{t:.2f}"] = _params(ctx, t, knots, MAX_OFFSET, denser_kv)
        return result


def block_offsets(params: Params, ctx: SpaceContext) -> list[float]:
    """Each block's offset: the knots' curve at its depth, less its share of ``spare_influential``."""
    last = max(ctx.num_blocks - 1, 1)
    depths = np.arange(ctx.num_blocks) / last
    curve = np.interp(depths, np.linspace(0.0, 1.0, KNOTS), [params[knot_param(k)] for k in range(KNOTS)])
    influence = np.asarray(ctx.block_influence, dtype=np.float64)
    peak = float(influence.max()) if influence.size and influence.max() > 0 else 1.0
    return (curve - params[SPARE] * influence / peak).tolist()


def _params(
    ctx: SpaceContext, target: float, knots: list[float], spare: float, projections: dict[str, float]
) -> Params:
    return {
        TARGET: target,
        **{knot_param(knot): value for knot, value in enumerate(knots)},
        SPARE: spare,
        **{projection_param(name): projections.get(name, 0.0) for name in ctx.projections},
    }
