"""``layerwise``: per-block and per-projection offsets around a target.

This is the question BESA and OWL answer by rule (which layers can take more sparsity), answered by
search instead. A layer's sparsity is the target plus its block's offset plus its projection's
(``q_proj`` ... ``down_proj``, the same in every block): projections differ in how much sparsity
they take more than attention and MLP do, and the narrow GQA projections (k, v) cost little of
the budget (measured in experiments/README.md). Offsets only
shape the allocation: the result is projected onto the target's exact non-zero budget, so
candidates of one target differ in quality, never in size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from optuna.distributions import BaseDistribution, FloatDistribution

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

MAX_OFFSET = 0.2
MAX_PROJECTION_OFFSET = 0.3
#: Depth slopes of the seeded allocations (sparsity rising from first to last block by this much).
SEED_SLOPES = (0.2, 0.4)


def block_param(block: int) -> str:
    return f"block_{block}"


def projection_param(projection: str) -> str:
    return f"offset_{projection}"


def projection_distributions(ctx: SpaceContext) -> dict[str, BaseDistribution]:
    """One ``offset_<projection>`` per projection of ``ctx``'s blocks, the same in every block."""
    offset = FloatDistribution(-MAX_PROJECTION_OFFSET, MAX_PROJECTION_OFFSET)
    return {projection_param(name): offset for name in ctx.projections}


class LayerwiseSpace(SearchSpace):
    """``target``, one ``offset_<projection>`` per projection and one ``block_i`` offset per
    decoder block."""

    name = "layerwise"

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        offset = FloatDistribution(-MAX_OFFSET, MAX_OFFSET)
        return {
            TARGET: ctx.target_distribution(),
            **projection_distributions(ctx),
            **{block_param(block): offset for block in range(ctx.num_blocks)},
        }

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        return self.allocate(params, ctx, removed_blocks=[])

    def allocate(self, params: Params, ctx: SpaceContext, removed_blocks: list[int]) -> Plan:
        """The offsets' allocation over the blocks that are kept, on the target's budget."""
        target = params[TARGET]
        removed = set(removed_blocks)
        raw = {
            name: target
            + params[block_param(info.block)]
            + params[projection_param(info.projection)]
            for name, info in ctx.layers.items()
            if info.block not in removed
        }
        return project_to_budget(raw, ctx, target, removed_blocks)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Uniform (all offsets zero) and OWL (its block deviations as offsets) at each target."""
        ratios = torch.tensor(ctx.outlier_ratios[OWL_DEFAULT_M], dtype=torch.float64)
        same = _no_projection_offsets(ctx)
        result = {}
        for t in targets:
            flat = {block_param(block): 0.0 for block in range(ctx.num_blocks)}
            result[f"uniform@{t:.2f}"] = {TARGET: t, **same, **flat}
            owl = owl_block_sparsities(ratios, t, OWL_DEFAULT_LAMBDA)
            offsets = {
                block_param(block): min(max(s - t, -MAX_OFFSET), MAX_OFFSET)
                for block, s in enumerate(owl)
            }
            result[f"owl@{t:.2f}"] = {TARGET: t, **same, **offsets}
        return result

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Depth ramps (later blocks sparser, at each of :data:`SEED_SLOPES`) that spare blocks in
        proportion to their influence (how much a block changes its input): the two regularities
        of small LLMs' pruning sensitivity, as starting points for the per-block search."""
        last = max(ctx.num_blocks - 1, 1)
        same = _no_projection_offsets(ctx)
        peak = max(ctx.block_influence) or 1.0
        result = {}
        for t in targets:
            for slope in SEED_SLOPES:
                offsets = {
                    block_param(block): min(
                        max(slope * (block / last - 0.5) - MAX_OFFSET * influence / peak, -MAX_OFFSET),
                        MAX_OFFSET,
                    )
                    for block, influence in enumerate(ctx.block_influence)
                }
                result[f"ramp{slope:g}@{t:.2f}"] = {TARGET: t, **same, **offsets}
        return result


def _no_projection_offsets(ctx: SpaceContext) -> Params:
    return {projection_param(name): 0.0 for name in ctx.projections}
