"""What a sub-network plan keeps of each block, as numbers a predictor can read.

A plan with a :class:`~autoprune.structure.Structure` keeps, per block, some query heads (in whole
KV groups), some FFN channels, or drops a sub-block. How many is the width; *which* ones go is the
structured method's choice, and, as with unstructured sparsity (see :mod:`._importance`), how much
of a block's importance a cut removes says more than its width: the share of the units' importance
scores that the kept units leave out. Scores are the ``weighted`` metric's (activation norm times
the consuming column's norm, on ``o_proj`` for heads and ``down_proj`` for channels), whatever the
plan's structured method: a proxy read from the cached statistics without a solve, not the method's
own choice. Heads are selected as the structured methods select them (whole groups, then the same
count inside each), so the share is that of the heads a ``weighted`` cut would keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.structure import BlockShape, ModelDims, resolve_blocks, select_by_scores
from search_spaces import SpaceContext

#: Per-block width columns, in order.
WIDTH_COLUMNS = (
    "heads_kept", "kv_groups_kept", "ffn_kept", "drop_attention", "drop_mlp",
    "heads_mass_removed", "ffn_mass_removed",
)
#: Model-wide width columns: plain means over blocks, then influence-weighted shares missing.
WIDTH_SUMMARIES = (
    "heads_kept", "ffn_kept", "dropped_attention", "dropped_mlp",
    "heads_mass_removed", "ffn_mass_removed",
    "heads_missing_influence", "ffn_missing_influence",
)


@dataclass(frozen=True)
class BlockWidthRow:
    """One block's width features (a removed block keeps nothing)."""

    heads: float
    kv_groups: float
    ffn: float
    drop_attention: bool
    drop_mlp: bool
    heads_mass_removed: float
    ffn_mass_removed: float

    def values(self) -> list[float]:
        return [self.heads, self.kv_groups, self.ffn, float(self.drop_attention), float(self.drop_mlp),
                self.heads_mass_removed, self.ffn_mass_removed]


class WidthTable:
    """Per block, the importance scores of its heads and FFN channels (the space context's, see
    :attr:`search_spaces.SpaceContext.unit_scores`), and the share a given width removes
    (computed once per width asked for)."""

    def __init__(self, ctx: SpaceContext) -> None:
        if ctx.dims is None:
            raise AutopruneError("width features need a LLaMA-family model (heads and FFN widths to cut)")
        self.dims: ModelDims = ctx.dims
        dims = self.dims
        self.heads_layout = dims.head_layout
        self._heads: list[torch.Tensor] = []
        self._ffn_prefix: list[np.ndarray] = []
        for block in range(dims.num_blocks):
            heads, channels = ctx.unit_scores[block]
            self._heads.append(torch.tensor(heads, dtype=torch.float64))
            ordered = torch.sort(torch.tensor(channels, dtype=torch.float64), descending=True).values
            prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
            self._ffn_prefix.append((prefix / prefix[-1].clamp_min(1e-30)).numpy())
        self._heads_removed: dict[tuple[int, int, int], float] = {}

    def shapes(self, plan: Plan) -> list[BlockShape | None]:
        """Each block's shape under ``plan`` (a one-line error for a structure that does not fit)."""
        return resolve_blocks(plan.structure, plan.removed_blocks, self.dims)

    def rows(self, plan: Plan) -> list[BlockWidthRow]:
        """Every block's width features under ``plan``."""
        structure = plan.structure
        rows = []
        for block, shape in enumerate(self.shapes(plan)):
            if shape is None:
                rows.append(BlockWidthRow(0.0, 0.0, 0.0, False, False, 1.0, 1.0))
                continue
            widths = structure.widths(block) if structure is not None else None
            rows.append(BlockWidthRow(
                heads=shape.heads / self.dims.num_heads,
                kv_groups=shape.kv_groups / self.dims.num_kv_heads,
                ffn=shape.ffn / self.dims.ffn,
                drop_attention=bool(widths and widths.drop_attention),
                drop_mlp=bool(widths and widths.drop_mlp),
                heads_mass_removed=self.heads_removed(block, shape.kv_groups, shape.heads_per_group),
                ffn_mass_removed=float(1.0 - self._ffn_prefix[block][shape.ffn]),
            ))
        return rows

    def heads_removed(self, block: int, groups: int, per_group: int) -> float:
        """Share of block ``block``'s head score mass outside the heads a ``weighted`` cut to
        ``groups`` KV groups of ``per_group`` query heads keeps."""
        key = (block, groups, per_group)
        if key not in self._heads_removed:
            scores = self._heads[block]
            kept = select_by_scores(scores, self.heads_layout, groups, per_group) if groups * per_group else []
            share = float(scores[kept].sum() / scores.sum().clamp_min(1e-30)) if kept else 0.0
            self._heads_removed[key] = 1.0 - share
        return self._heads_removed[key]


def width_summaries(rows: list[BlockWidthRow], influence: np.ndarray) -> list[float]:
    """The model-wide width columns (:data:`WIDTH_SUMMARIES`) of one plan's block rows."""
    table = np.array([row.values() for row in rows])
    heads, ffn = table[:, 0], table[:, 2]
    weights = influence / influence.sum() if influence.sum() > 0 else np.full(len(rows), 1.0 / len(rows))
    return [
        float(heads.mean()), float(ffn.mean()), float(table[:, 3].sum()), float(table[:, 4].sum()),
        float(table[:, 5].mean()), float(table[:, 6].mean()),
        float(weights @ (1.0 - heads)), float(weights @ (1.0 - ffn)),
    ]
