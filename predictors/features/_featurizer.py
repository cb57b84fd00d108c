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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.calibration import CalibrationStats
from autoprune.models import LoadedModel
from autoprune.plan import LayerSpec, Plan
from predictors.features._importance import ImportanceTable
from predictors.features._schema import FeatureSchema, layers_hash
from search_spaces import LayerInfo, SpaceContext

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


def feature_names(layers: dict[str, LayerInfo], num_blocks: int) -> tuple[str, ...]:
    per_block = [f"{proj}.{stat}" for proj in projections(layers) for stat in _PER_PROJECTION]
    per_block += list(_PER_BLOCK)
    return tuple(
        [f"block{block}.{name}" for block in range(num_blocks) for name in per_block]
        + [f"model.{name}" for name in _GLOBAL]
    )


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

    @classmethod
    def from_model(cls, loaded: LoadedModel, stats: CalibrationStats, ctx: SpaceContext) -> Featurizer:
        """Build the importance tables of ``loaded`` (seconds, once per process)."""
        schema = FeatureSchema(
            model_fingerprint=loaded.fingerprint(),
            calibration=str(stats.meta["key"]),
            num_blocks=ctx.num_blocks,
            layers=tuple(ctx.layers),
            layers_hash=layers_hash(ctx.layers),
            names=feature_names(ctx.layers, ctx.num_blocks),
        )
        return cls(ctx, ImportanceTable(loaded, stats, list(ctx.layers)), schema)

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
            self.ctx.nonzeros(plan) / self.ctx.dense_linear_params,
            float(mass.sum() / self._weights.sum()),
            *(
                float(mass[part].sum() / self._weights[part].sum())
                for part in (self._attention, ~self._attention)
            ),
            float(block_mass.max()),
            float(removed.sum()),
            float(influence.sum()),
        ]
        return np.concatenate([per_block.ravel(), model])
