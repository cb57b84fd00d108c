"""Plans as fixed-length feature vectors.

Per decoder block and projection type (``self_attn.q_proj``, ``mlp.down_proj``, ...): the sparsity
and the share of the Wanda score mass removed (see :mod:`._importance`); per block the
weight-averaged share under an N:M pattern, whether the block is removed and, if so, its block
influence. Globally: the kept fraction of decoder linear weights, the mass removed over all layers
and over the attention and the MLP layers, the worst block's mass removed, the number of removed
blocks and their summed influence. The importance features are what lets a predictor trained on
some targets rank allocations at others: they say *which* weights a plan removes, not just how
many. Mass is always Wanda's (the scores the cached statistics give without a solve), whatever
the plan's method: a proxy of importance, not the method's own error.

A featurizer built ``widths=True`` (for a space of sub-network plans) adds what a plan's
:class:`~autoprune.structure.Structure` keeps of each block (see :mod:`._widths`), and reads its
cuts into the columns above: a projection's sparsity and mass removed count the weights its block's
heads or channels cut away (all of them for a dropped sub-block), and the kept fraction is the
sub-network's. A plan without a structure featurizes exactly as without ``widths``, plus the width
columns; a featurizer without them refuses a plan with a structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.calibration import CalibrationStats
from autoprune.errors import AutopruneError
from autoprune.models import LoadedModel
from autoprune.plan import LayerSpec, Plan
from predictors.features._importance import ImportanceTable
from predictors.features._schema import FeatureSchema, layers_hash
from predictors.features._widths import (
    WIDTH_COLUMNS,
    WIDTH_SUMMARIES,
    BlockWidthRow,
    WidthTable,
    width_summaries,
)
from search_spaces import LayerInfo, SearchSpace, SpaceContext

KINDS = ("attention", "mlp")
_PER_PROJECTION = ("sparsity", "mass_removed")
_PER_BLOCK = ("nm_share", "removed", "removed_influence")
_GLOBAL = (
    "kept_fraction",
    "mass_removed",
    *(f"{kind}.mass_removed" for kind in KINDS),
    "max_block_mass_removed",
    "removed_blocks",
    "removed_influence",
)
_DENSE = LayerSpec()


def projection_of(name: str, info: LayerInfo) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``: the layer's name inside its block."""
    return name.split(f".{info.block}.", 1)[1]


def projections(layers: dict[str, LayerInfo]) -> tuple[str, ...]:
    """The projection types of a block, in the model's order (every block has the same ones)."""
    return tuple(dict.fromkeys(projection_of(name, info) for name, info in layers.items()))


def feature_names(layers: dict[str, LayerInfo], num_blocks: int, widths: bool = False) -> tuple[str, ...]:
    """The columns, in order; ``widths`` appends the width columns after all others."""
    per_block = [f"{proj}.{stat}" for proj in projections(layers) for stat in _PER_PROJECTION]
    per_block += list(_PER_BLOCK)
    names = [f"block{block}.{name}" for block in range(num_blocks) for name in per_block]
    names += [f"model.{name}" for name in _GLOBAL]
    if widths:
        names += [f"block{block}.{name}" for block in range(num_blocks) for name in WIDTH_COLUMNS]
        names += [f"model.{name}" for name in WIDTH_SUMMARIES]
    return tuple(names)


def space_has_widths(space: SearchSpace, ctx: SpaceContext) -> bool:
    """Whether ``space`` makes sub-network plans: those it casts from the low and from the high
    end of every one of its distributions (the first or the last choice of a categorical one)."""
    distributions = space.distributions(ctx)
    for end in (0, -1):
        params = {
            name: d.choices[end] if hasattr(d, "choices") else (d.low, d.high)[end]
            for name, d in distributions.items()
        }
        try:
            if space.cast(params, ctx).structure is not None:
                return True
        except AutopruneError:
            continue  # an extreme the space refuses says nothing either way
    return False


class Featurizer:
    """Turns plans of one model into feature rows; its :attr:`schema` says which model that is."""

    def __init__(self, ctx: SpaceContext, table: ImportanceTable, schema: FeatureSchema) -> None:
        self.ctx, self.table, self.schema = ctx, table, schema
        infos = list(ctx.layers.values())
        kinds = projections(ctx.layers)
        self._names = list(ctx.layers)
        self._blocks = np.array([info.block for info in infos])
        self._projections = np.array(
            [kinds.index(projection_of(name, info)) for name, info in ctx.layers.items()]
        )
        self._attention = np.array([info.kind == "attention" for info in infos])
        self._weights = np.array([info.rows * info.cols for info in infos], dtype=float)
        self._block_weights = np.bincount(self._blocks, self._weights, ctx.num_blocks)
        self._shape = (ctx.num_blocks, len(kinds), len(_PER_PROJECTION))
        self._influence = np.array(ctx.block_influence, dtype=float)
        self.widths: WidthTable | None = None
        # Per layer, which width of its block it follows: 0 query heads, 1 KV groups, 2 channels.
        self._width_of = np.array([
            2 if info.kind != "attention" else 1 if info.projection in ("k_proj", "v_proj") else 0
            for info in infos
        ])

    @classmethod
    def from_model(
        cls, loaded: LoadedModel, stats: CalibrationStats, ctx: SpaceContext, widths: bool = False
    ) -> Featurizer:
        """Build the importance tables of ``loaded`` (seconds, once per process); ``widths`` adds
        the sub-network features (LLaMA-family models only)."""
        schema = FeatureSchema(
            model_fingerprint=loaded.fingerprint(),
            calibration=str(stats.meta["key"]),
            num_blocks=ctx.num_blocks,
            layers=tuple(ctx.layers),
            layers_hash=layers_hash(ctx.layers),
            names=feature_names(ctx.layers, ctx.num_blocks, widths),
            widths=widths,
        )
        featurizer = cls(ctx, ImportanceTable(loaded, stats, list(ctx.layers)), schema)
        if widths:
            featurizer.widths = WidthTable(ctx)
        return featurizer

    @property
    def names(self) -> tuple[str, ...]:
        return self.schema.names

    def transform(self, plans: Sequence[Plan]) -> np.ndarray:
        """One row per plan, columns as :attr:`names`."""
        return np.array([self._row(plan) for plan in plans], dtype=float).reshape(len(plans), -1)

    def _row(self, plan: Plan) -> np.ndarray:
        self.schema.check_plan(plan)
        removed = np.zeros(self.ctx.num_blocks, dtype=bool)
        removed[plan.removed_blocks] = True
        per_layer = np.zeros((len(self._names), len(_PER_PROJECTION)))
        nm = np.zeros(len(self._names))
        for index, name in enumerate(self._names):
            spec = plan.layers.get(name, _DENSE)
            if removed[self._blocks[index]]:
                per_layer[index] = (1.0, 1.0)
            elif not spec.is_dense:
                per_layer[index] = (spec.effective_sparsity, self.table.removed_share(name, spec))
                nm[index] = spec.nm is not None
        block_widths = self.widths.rows(plan) if self.widths is not None else None
        if block_widths is not None and plan.structure is not None:
            kept_width, width_mass = self._cut_by_widths(block_widths)
            per_layer[:, 0] = 1.0 - kept_width * (1.0 - per_layer[:, 0])
            per_layer[:, 1] = 1.0 - (1.0 - width_mass) * (1.0 - per_layer[:, 1])
            kept_fraction = float((self._weights * (1.0 - per_layer[:, 0])).sum() / self._weights.sum())
        else:
            kept_fraction = self.ctx.nonzeros(plan) / self.ctx.dense_linear_params
        per_projection = np.zeros(self._shape)
        per_projection[self._blocks, self._projections] = per_layer
        mass = per_layer[:, 1] * self._weights
        nm_share = np.bincount(self._blocks, nm * self._weights, self.ctx.num_blocks) / self._block_weights
        block_mass = np.bincount(self._blocks, mass, self.ctx.num_blocks) / self._block_weights
        influence = np.where(removed, self._influence, 0.0)
        per_block = np.column_stack(
            [per_projection.reshape(self.ctx.num_blocks, -1), nm_share, removed, influence]
        )
        model = [
            kept_fraction,
            float(mass.sum() / self._weights.sum()),
            *(
                float(mass[part].sum() / self._weights[part].sum())
                for part in (self._attention, ~self._attention)
            ),
            float(block_mass.max()),
            float(removed.sum()),
            float(influence.sum()),
        ]
        row = np.concatenate([per_block.ravel(), model])
        if block_widths is None:
            return row
        widths = [value for block in block_widths for value in block.values()]
        return np.concatenate([row, widths, width_summaries(block_widths, self._influence)])

    def _cut_by_widths(self, block_widths: list[BlockWidthRow]) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, the share of its weights its block's widths keep, and the share of its
        block's head (attention layers) or channel (MLP layers) score mass they remove."""
        table = np.array([[b.heads, b.kv_groups, b.ffn, b.heads_mass_removed, b.ffn_mass_removed]
                          for b in block_widths])
        kept = table[self._blocks, self._width_of]
        mass = table[self._blocks, np.where(self._width_of == 2, 4, 3)]
        return kept, mass
