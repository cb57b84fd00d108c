"""Level switches between the widths of a sub-network plan, at equal cost (DarwinLM's mutation).

A sub-network plan (one with a :class:`~autoprune.structure.Structure`) is refined on its widths,
not on per-layer sparsity: each kept block's FFN width and query-head count is a *level*, and a
switch moves one block (or sub-block kind) down one level and another up one level, so the
sub-network keeps its size. FFN levels are steps of 1/:data:`FFN_LEVELS` of the dense FFN; head
levels are the head counts grouped-query attention allows (``heads_to_groups``: whole KV groups,
the same number of heads in each). Moves of different kinds or between uneven levels do not cancel
exactly, so a switch is taken only when it leaves the decoder linear weights within one FFN level
of the parent trial's (the budget never drifts: it is the trial's, not the last child's).

Dropped sub-blocks and removed blocks stay as the trial had them; a block whose widths no switch
touched keeps the trial's exact widths (a head count has several GQA shapes: 3 heads are 3 groups
of 1 or 1 group of 3, and only a moved count is re-shaped by ``heads_to_groups``).
"""

from __future__ import annotations

import random

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.structure import (
    BlockWidths,
    ModelDims,
    Structure,
    decoder_linear_params,
    heads_to_groups,
    resolve_blocks,
)

#: FFN widths move in steps of this fraction of the dense FFN (DarwinLM's level grid).
FFN_LEVELS = 12


def gqa_head_counts(dims: ModelDims) -> list[int]:
    """Query-head counts a block can keep consistently with grouped-query attention, ascending."""
    counts = []
    for heads in range(1, dims.num_heads + 1):
        try:
            heads_to_groups(heads, dims)
        except AutopruneError:
            continue
        counts.append(heads)
    return counts


def width_levels(plan: Plan, dims: ModelDims) -> dict[str, int]:
    """The plan's refinable widths: ``"<block>.ffn"`` (channels) and ``"<block>.heads"`` (query
    heads) of every kept block whose sub-block is kept."""
    counts: dict[str, int] = {}
    for block, shape in enumerate(resolve_blocks(plan.structure, plan.removed_blocks, dims)):
        if shape is None:
            continue
        if shape.heads:
            counts[f"{block}.heads"] = shape.heads
        if shape.ffn:
            counts[f"{block}.ffn"] = shape.ffn
    if not counts:
        raise AutopruneError("the sub-network keeps no heads or FFN channels to move between blocks")
    return counts


class WidthAllocation:
    """Per-block widths of a sub-network being refined, and the switches that keep its size.

    The same interface as the per-layer :class:`~._allocation.Allocation` (``counts``,
    ``mutated``, ``plan``, ``with_counts``), so the evolution runs either.
    """

    def __init__(self, counts: dict[str, int], base: Plan, dims: ModelDims) -> None:
        self.counts = dict(counts)
        self.base, self.dims = base, dims
        self.start = width_levels(base, dims)
        self.heads_levels = gqa_head_counts(dims)
        self.ffn_step = max(1, dims.ffn // FFN_LEVELS)
        self.budget = self.params(self.start)
        #: One level's weights: how far from the budget a switch may leave the sub-network.
        self.tolerance = 3 * dims.hidden * self.ffn_step

    def with_counts(self, counts: dict[str, int]) -> WidthAllocation:
        return WidthAllocation(counts, self.base, self.dims)

    def params(self, counts: dict[str, int]) -> int:
        """Decoder linear weights of the sub-network with these widths."""
        shapes = resolve_blocks(self._structure(counts), self.base.removed_blocks, self.dims)
        return decoder_linear_params(shapes, self.dims)

    def step(self, key: str, direction: int) -> int | None:
        """The width one level below (``-1``) or above (``+1``) ``key``'s, or None at the end."""
        value = self.counts[key]
        if key.endswith(".ffn"):
            moved = value + direction * self.ffn_step
            moved = min(moved, self.dims.ffn)
            return moved if self.ffn_step <= moved != value else None
        levels = self.heads_levels
        below = [h for h in levels if h < value]
        above = [h for h in levels if h > value]
        if direction < 0:
            return below[-1] if below else None
        return above[0] if above else None

    def mutated(self, rng: random.Random, switches: int) -> WidthAllocation:
        """A copy with ``switches`` random level switches applied (fewer if none fits)."""
        child = self.with_counts(self.counts)
        keys = list(self.counts)
        if len(keys) < 2:
            return child
        for _ in range(switches):
            for _attempt in range(2 * len(keys)):
                down, up = rng.sample(keys, 2)
                lower, higher = child.step(down, -1), child.step(up, +1)
                if lower is None or higher is None:
                    continue
                counts = {**child.counts, down: lower, up: higher}
                if abs(self.params(counts) - self.budget) <= self.tolerance:
                    child.counts = counts
                    break
        return child

    def plan(self, base: Plan) -> Plan:
        """``base`` with these widths (blocks no switch moved keep ``base``'s own)."""
        return base.model_copy(update={"structure": self._structure(self.counts, base)})

    def _structure(self, counts: dict[str, int], base: Plan | None = None) -> Structure:
        base = base or self.base
        original = base.structure or Structure()
        blocks: dict[int, BlockWidths] = {}
        for block in range(self.dims.num_blocks):
            if block in base.removed_blocks:
                continue
            widths = original.widths(block)
            update: dict[str, int] = {}
            heads = counts.get(f"{block}.heads")
            if heads is not None and heads != self.start.get(f"{block}.heads"):
                update["kv_groups"], update["heads_per_group"] = heads_to_groups(heads, self.dims)
            ffn = counts.get(f"{block}.ffn")
            if ffn is not None and ffn != self.start.get(f"{block}.ffn"):
                update["ffn"] = ffn
            blocks[block] = widths.model_copy(update=update)
        return original.model_copy(update={"every_block": BlockWidths(), "blocks": blocks})
