"""The refined layers' per-row prune counts and the level switches that move sparsity between
them while keeping the total: every candidate has the parent's exact non-zeros."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from autoprune.methods import prune_count
from autoprune.plan import LayerSpec, Plan
from autoprune.pruner import Pruner
from search_spaces import MAX_LAYER_SPARSITY


@dataclass(frozen=True)
class LevelSwitch:
    """Prune ``more_per_row`` more weights in each row of ``sparser`` and ``fewer_per_row`` fewer in
    each row of ``denser``: the same number of weights in all."""

    sparser: str
    denser: str
    more_per_row: int
    fewer_per_row: int


class Allocation:
    """Per-row prune counts of the layers being refined, and the moves that keep their total.

    ``rows * count`` is what a layer removes; a switch between layers ``a`` and ``b`` moves a
    multiple of ``lcm(rows_a, rows_b)`` weights, the smallest amount both can move in whole rows,
    sized so the smaller of the two layers moves about ``step`` of its weights.
    """

    def __init__(self, counts: dict[str, int], shapes: dict[str, tuple[int, int]], step: float) -> None:
        self.counts = dict(counts)
        self.shapes = shapes
        self.step = step

    def with_counts(self, counts: dict[str, int]) -> Allocation:
        """The same layers at other per-row prune counts."""
        return Allocation(counts, self.shapes, self.step)

    def removed(self) -> int:
        return sum(self.shapes[name][0] * count for name, count in self.counts.items())

    def cap(self, name: str) -> int:
        """The most a row may lose: the search spaces' per-layer cap, and always one weight kept."""
        cols = self.shapes[name][1]
        return min(int(MAX_LAYER_SPARSITY * cols), cols - 1)

    def switch(self, sparser: str, denser: str) -> LevelSwitch | None:
        """The level switch between two layers, or None where either would leave its range."""
        (rows_a, cols_a), (rows_b, cols_b) = self.shapes[sparser], self.shapes[denser]
        unit = math.lcm(rows_a, rows_b)
        units = max(1, round(self.step * min(rows_a * cols_a, rows_b * cols_b) / unit))
        more, less = units * unit // rows_a, units * unit // rows_b
        if self.counts[sparser] + more > self.cap(sparser) or self.counts[denser] - less < 0:
            return None
        return LevelSwitch(sparser, denser, more, less)

    def mutated(self, rng: random.Random, switches: int) -> Allocation:
        """A copy with ``switches`` random level switches applied (fewer if none fits)."""
        child = self.with_counts(self.counts)
        names = list(self.counts)
        for _ in range(switches):
            for _attempt in range(len(names)):
                move = child.switch(*rng.sample(names, 2))
                if move is not None:
                    child.counts[move.sparser] += move.more_per_row
                    child.counts[move.denser] -= move.fewer_per_row
                    break
        return child

    def plan(self, base: Plan) -> Plan:
        """``base`` with these layers' sparsities (a count over the row width, which prunes
        exactly that count)."""
        layers = dict(base.layers)
        for name, count in self.counts.items():
            layers[name] = LayerSpec(sparsity=count / self.shapes[name][1])
        return base.model_copy(update={"layers": layers})


def refinable_layers(plan: Plan, pruner: Pruner) -> dict[str, int]:
    """Per-row prune counts of the plan's unstructured layers in kept blocks (N:M layers keep
    their pattern; a dense layer can receive sparsity)."""
    shapes = pruner.layer_shapes()
    return {
        name: prune_count(spec.sparsity, shapes[name][1])
        for name, spec in pruner.kept_layers(plan).items()
        if spec.nm is None
    }
