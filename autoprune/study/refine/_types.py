"""Level switches between the GGUF types of a quantized plan, at its bytes (EvoPress's level switch
with quantization levels).

Each tensor the plan gives a type (decoder linear layers, token embeddings, an untied output head)
is on a ladder of the types its rows can hold, fewest bytes first. A switch moves one tensor down a
rung and another up one; the bytes of two tensors' rungs rarely cancel, so a switch is taken only
when the tensors' bytes stay at or below the parent trial's and within :data:`BYTES_TOLERANCE` of
them: every candidate is at no more bytes than the trial it refines, and the budget never drifts
(it is the trial's, not the last child's). The importance matrix, structure and sparsity stay as
the trial has them.
"""

from __future__ import annotations

import random

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.quantization import EMBEDDINGS, OUTPUT, GGUF_TENSOR_TYPES, offered_types, tensor_bytes

#: How far below the trial's tensor bytes a candidate may land (a fraction of them).
BYTES_TOLERANCE = 0.005


def type_ladders(plan: Plan, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Each tensor's ladder (the types its rows hold, its own included, fewest bytes first) and the
    rung the plan puts it on."""
    assert plan.quantization is not None
    ladders, counts = {}, {}
    for tensor, (_rows, cols) in shapes.items():
        own = plan.quantization.type_of(tensor)
        kinds = {*offered_types(cols), own}
        ladder = sorted(kinds, key=lambda k: (GGUF_TENSOR_TYPES[k].bits_per_weight, list(GGUF_TENSOR_TYPES).index(k)))
        ladders[tensor], counts[tensor] = ladder, ladder.index(own)
    return ladders, counts


class TypeAllocation:
    """Per-tensor rungs of a quantized plan being refined, and the switches that keep its bytes.

    The same interface as :class:`~._allocation.Allocation` (``counts``, ``mutated``, ``plan``,
    ``with_counts``), so the evolution runs it."""

    def __init__(self, counts: dict[str, int], base: Plan, ladders: dict[str, list[str]],
                 shapes: dict[str, tuple[int, int]]) -> None:
        if len(counts) < 2:
            raise AutopruneError("the quantized plan gives fewer than two tensors a type to move bits between")
        self.counts = dict(counts)
        self.base, self.ladders, self.shapes = base, ladders, shapes
        start = type_ladders(base, shapes)[1]
        self.budget = self.bytes(start)
        self.floor = self.budget * (1.0 - BYTES_TOLERANCE)

    @classmethod
    def of(cls, base: Plan, shapes: dict[str, tuple[int, int]]) -> TypeAllocation:
        ladders, counts = type_ladders(base, shapes)
        return cls(counts, base, ladders, shapes)

    def with_counts(self, counts: dict[str, int]) -> TypeAllocation:
        return TypeAllocation(counts, self.base, self.ladders, self.shapes)

    def bytes(self, counts: dict[str, int]) -> int:
        """The tensors' bytes at these rungs."""
        return sum(tensor_bytes(self.ladders[t][level], *self.shapes[t]) for t, level in counts.items())

    def rung_bytes(self, tensor: str, level: int) -> int:
        return tensor_bytes(self.ladders[tensor][level], *self.shapes[tensor])

    def mutated(self, rng: random.Random, switches: int) -> TypeAllocation:
        """A copy with ``switches`` random level switches applied (fewer if none fits)."""
        child = self.with_counts(self.counts)
        total = self.bytes(child.counts)
        for _ in range(switches):
            for _attempt in range(len(self.counts)):
                moved = self._switch(rng, child.counts, total)
                if moved is not None:
                    child.counts, total = moved
                    break
        return child

    def _switch(self, rng: random.Random, counts: dict[str, int], total: int) -> tuple[dict[str, int], int] | None:
        """One tensor a rung down (or up), then others a rung up (or down) each, in random order,
        until the bytes are back inside the window: a tensor's rung may be worth several of
        another's (the embeddings' of many layers'). None where the window is not reached."""
        counts = dict(counts)

        def move(tensor: str, step: int) -> bool:
            nonlocal total
            level = counts[tensor] + step
            if not 0 <= level < len(self.ladders[tensor]):
                return False
            total += self.rung_bytes(tensor, level) - self.rung_bytes(tensor, counts[tensor])
            counts[tensor] = level
            return True

        tensors = list(counts)
        first = rng.choice(tensors)
        if not move(first, rng.choice((-1, 1))):
            return None
        for tensor in rng.sample(tensors, len(tensors)):
            if self.floor <= total <= self.budget:
                break
            if tensor != first:
                move(tensor, 1 if total < self.floor else -1)
        return (counts, total) if self.floor <= total <= self.budget else None

    def plan(self, base: Plan) -> Plan:
        """``base`` with these tensors' types."""
        assert base.quantization is not None
        types = {tensor: self.ladders[tensor][level] for tensor, level in self.counts.items()}
        layers = {**base.quantization.layers, **{t: k for t, k in types.items() if t not in (EMBEDDINGS, OUTPUT)}}
        update = {"layers": layers, "embeddings": types.get(EMBEDDINGS, base.quantization.embeddings),
                  "output": types.get(OUTPUT, base.quantization.output)}
        return base.model_copy(update={"quantization": base.quantization.model_copy(update=update)})
