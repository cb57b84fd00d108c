"""Building a database ahead of the plans that will read it, level after level, resumably.

A level is pruned for every layer still missing it in one call of the method (so second-order
methods batch all blocks, as a whole-model prune does) and each layer's variant is stored as soon
as the call returns. A build that is killed loses at most the level in progress; the same command
started again skips every stored entry (checked, so a damaged one is rebuilt) and continues.
Sub-network cuts build the same way (:func:`build_cuts`): a level cuts every block to one width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from autoprune.plan import MethodName, Plan
from autoprune.pruner import Pruner
from autoprune.structure import (
    DEFAULT_CORRECTION,
    DEFAULT_STRUCTURED_METHOD,
    BlockWidths,
    Structure,
    StructuredMethodName,
)
from autoprune.variants._levels import Level


@dataclass
class BuildReport:
    """What a build did: per level, the layers pruned, seconds and bytes written."""

    method: str
    folder: str
    levels: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(level["seconds"] for level in self.levels)

    @property
    def layers_pruned(self) -> int:
        return sum(level["pruned"] for level in self.levels)


def build_database(
    pruner: Pruner, method: MethodName, levels: list[Level], progress: bool = True
) -> BuildReport:
    """Prune every layer of ``pruner``'s model to every level in ``levels`` by ``method`` into
    ``pruner.database``, skipping the entries it already holds. N:M levels skip layers whose width
    the pattern does not divide."""
    database = pruner.database
    if database is None:
        raise ValueError("the pruner has no variant database to build")
    report = BuildReport(method=method, folder=str(database.root))
    bar = tqdm(levels, desc=f"building {method} variants", unit="level", disable=not progress)
    for level in bar:
        bar.set_postfix_str(str(level))
        spec = level.spec()
        specs = {
            name: spec
            for name, (_rows, cols) in pruner.layer_shapes().items()
            if spec.nm is None or cols % spec.nm.m == 0
        }
        written, stored = database.counters.written, database.counters.bytes_written
        start = time.perf_counter()
        pruner.prune_layers(method, specs)  # reads what is stored, prunes and stores the rest
        report.levels.append({
            "level": str(level),
            "layers": len(specs),
            "pruned": database.counters.written - written,
            "seconds": round(time.perf_counter() - start, 3),
            "bytes_written": database.counters.bytes_written - stored,
        })
    return report


def build_cuts(
    pruner: Pruner,
    attention: list[tuple[int, int]],
    ffn: list[int],
    method: StructuredMethodName = DEFAULT_STRUCTURED_METHOD,
    correct: bool = DEFAULT_CORRECTION,
    progress: bool = True,
) -> BuildReport:
    """Cut every block of ``pruner``'s model to every width of ``attention`` ((KV groups, query
    heads per group), the others full) and of ``ffn`` (channels) into ``pruner.database``'s cuts,
    reading those it already holds. Level ``i`` cuts the ``i``-th of each list at once (one model
    built per level); where one list is shorter, that sub-block stays full."""
    database = pruner.database
    if database is None:
        raise ValueError("the pruner has no variant database to build")
    report = BuildReport(method=f"cuts ({method}{'' if correct else ', uncorrected'})",
                         folder=str(database.cuts.root))
    levels = [(attention[i] if i < len(attention) else None, ffn[i] if i < len(ffn) else None)
              for i in range(max(len(attention), len(ffn)))]
    bar = tqdm(levels, desc="building sub-network cuts", unit="level", disable=not progress)
    for heads, channels in bar:
        widths = BlockWidths(kv_groups=heads[0] if heads else None, heads_per_group=heads[1] if heads else None,
                             ffn=channels)
        label = f"heads {heads[0]}x{heads[1]}" if heads else "heads full"
        label += f", ffn {channels}" if channels else ", ffn full"
        bar.set_postfix_str(label)
        written, stored = database.counters.written, database.counters.bytes_written
        start = time.perf_counter()
        pruner.subnet(Plan(structure=Structure(method=method, correct=correct, every_block=widths)))
        report.levels.append({
            "level": label,
            "layers": pruner.num_blocks,
            "pruned": database.counters.written - written,
            "seconds": round(time.perf_counter() - start, 3),
            "bytes_written": database.counters.bytes_written - stored,
        })
    return report
