"""The discrete levels a variant database stores: unstructured steps on a grid, and N:M patterns.

An unstructured level is a per-row prune count. The grid of ``K`` steps holds, for a layer of
``cols`` inputs, the counts ``round(k * cols / K)`` for ``k = 1 .. K-1`` (multiples of ``cols / K``
where ``K`` divides ``cols``: for LLaMA-family widths, ``K = 32`` divides every one). Entries are
keyed by the count itself, not by ``k``, so databases on different grids share whatever counts they
have in common, and a spec is on the grid exactly when its count (what methods prune, see
:func:`autoprune.methods.prune_count`) is one of the grid's.
"""

from __future__ import annotations

from autoprune.errors import AutopruneError
from autoprune.methods import prune_count
from autoprune.plan import LayerSpec, NMPattern

#: Steps of the default grid: sparsity in steps of 1/32 (3.125%); divides 576 and 1536 (SmolLM2).
DEFAULT_GRID = 32


def check_grid(grid: int) -> int:
    """``grid`` if it is a usable number of steps (2 or more), else an :class:`AutopruneError`."""
    if not isinstance(grid, int) or grid < 2:
        raise AutopruneError(f"the variant grid needs at least 2 steps, got {grid!r}")
    return grid


def level_key(spec: LayerSpec, cols: int, grid: int) -> str | None:
    """The key of ``spec``'s level for a layer of ``cols`` inputs (``p<count>`` or ``nm<N>of<M>``),
    or None where the spec is dense or its prune count is not on the grid."""
    if spec.nm is not None:
        return f"nm{spec.nm.n}of{spec.nm.m}"
    count = int(prune_count(spec.sparsity, cols))
    if count == 0:
        return None
    step = round(count * grid / cols)
    if not 0 < step < grid or int(prune_count(step / grid, cols)) != count:
        return None
    return f"p{count}"


class Level:
    """One level asked for by a user: a grid step ``k / K`` or an N:M pattern."""

    def __init__(self, sparsity: float | None = None, nm: NMPattern | None = None) -> None:
        self.sparsity = sparsity
        self.nm = nm

    def spec(self) -> LayerSpec:
        """The layer spec of this level (on the grid for every layer width)."""
        return LayerSpec(nm=self.nm) if self.nm is not None else LayerSpec(sparsity=self.sparsity or 0.0)

    def __str__(self) -> str:
        return str(self.nm) if self.nm is not None else f"{self.sparsity:g}"


def parse_levels(items: list[str], grid: int) -> list[Level]:
    """Levels from ``items``: a sparsity on the grid (``0.5``), every grid step in a range
    (``0.25-0.95``), or an N:M pattern (``2:4``). Anything else is one :class:`AutopruneError`."""
    check_grid(grid)
    levels: dict[str, Level] = {}
    for item in items:
        for level in _parse_item(item.strip(), grid):
            levels.setdefault(str(level), level)
    if not levels:
        raise AutopruneError("no levels to build")
    return list(levels.values())


def grid_steps(low: float, high: float, grid: int) -> list[float]:
    """The grid's sparsities ``k / grid`` inside ``[low, high]`` (none of them dense)."""
    first = max(1, -int(-low * grid // 1))  # ceil
    last = min(grid - 1, int(high * grid // 1))
    return [step / grid for step in range(first, last + 1)]


def _parse_item(item: str, grid: int) -> list[Level]:
    if ":" in item:
        return [Level(nm=NMPattern.parse(item))]
    if "-" in item.lstrip("-"):
        low_text, high_text = item.split("-", 1)
        low, high = _fraction(low_text, item), _fraction(high_text, item)
        steps = grid_steps(low, high, grid)
        if low > high or not steps:
            raise AutopruneError(f"level range {item!r} holds no step of the grid of {grid}")
        return [Level(sparsity=step) for step in steps]
    value = _fraction(item, item)
    step = round(value * grid)
    if value == 0.0 or abs(value * grid - step) > 1e-9:
        nearest = min(max(step, 1), grid - 1) / grid
        raise AutopruneError(
            f"level {item} is not a step of the grid of {grid} (k/{grid}, for example {nearest:g})"
        )
    return [Level(sparsity=step / grid)]


def _fraction(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AutopruneError(f"invalid level {item!r}: expected a sparsity, a range LO-HI or N:M") from None
    if not 0.0 <= value < 1.0:
        raise AutopruneError(f"invalid level {item!r}: sparsities are in [0, 1)")
    return value
