"""What every search space is: a flat set of Optuna distributions and a cast into a :class:`Plan`.

A space never sees tensors. Everything it needs about the model (layer shapes and kinds, block
influence, OWL's outlier ratios) is gathered once into a :class:`SpaceContext`, so casting a trial's
parameters costs microseconds and the same parameters always give the same plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optuna.distributions import BaseDistribution, FloatDistribution

from autoprune.allocation import block_outlier_ratios
from autoprune.calibration import CalibrationStats
from autoprune.errors import AutopruneError
from autoprune.gguf_size import GGUFContext
from autoprune.measure import expected_linear_nonzeros
from autoprune.models import LayerKind, LoadedModel
from autoprune.plan import MethodName, Plan
from autoprune.structure import (
    ModelDims,
    kept_layer_shapes,
    model_dims,
    resolve_blocks,
    unit_scores,
)

#: The parameter every space with a size target calls it by: the fraction of the dense model's
#: decoder linear weights removed (removed blocks count).
TARGET = "target"
#: Spacing of searched targets (a fraction of the dense decoder linear weights).
TARGET_GRID = 0.01

#: OWL's outlier thresholds ``M`` that spaces may choose from; their ratios are computed once.
OWL_THRESHOLDS: tuple[float, ...] = (3.0, 5.0, 7.0, 10.0)
OWL_DEFAULT_M = 5.0
OWL_DEFAULT_LAMBDA = 0.08

Params = dict[str, Any]


@dataclass(frozen=True)
class LayerInfo:
    """One decoder linear layer as spaces see it."""

    block: int
    kind: LayerKind
    rows: int
    cols: int
    #: The layer's name inside its block without the module path (``q_proj``, ``down_proj``,
    #: ``fc1``): the same projection in every block.
    projection: str


@dataclass(frozen=True)
class SpaceContext:
    """What spaces need to know about the model, gathered once per search (plain data)."""

    method: MethodName
    layers: dict[str, LayerInfo]
    num_blocks: int
    block_influence: tuple[float, ...]
    outlier_ratios: dict[float, tuple[float, ...]] = field(default_factory=dict)
    sparsity_range: tuple[float, float] = (0.4, 0.8)
    #: The dense shape sub-network spaces cut (None: not a LLaMA-family model).
    dims: ModelDims | None = None
    #: Per block, the importance of each query head and of each FFN channel (FLAP's metric on the
    #: cached statistics, :func:`autoprune.structure.weighted_scores`); empty without ``dims``.
    unit_scores: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    #: Steps of a variant database's grid (see :mod:`autoprune.variants`): allocations put every
    #: layer but one on it, so trials read their layers instead of pruning them. None: no grid.
    grid: int | None = None
    #: The GGUF file's arithmetic and llama.cpp's preset mixes, for spaces of GGUF types (None:
    #: not gathered, or a model GGUF cannot express).
    gguf: GGUFContext | None = None

    @classmethod
    def from_model(
        cls,
        loaded: LoadedModel,
        stats: CalibrationStats,
        method: MethodName,
        sparsity_range: tuple[float, float],
        outlier_thresholds: Sequence[float] = OWL_THRESHOLDS,
    ) -> SpaceContext:
        adapter, model = loaded.adapter, loaded.model
        layers = {}
        for name in adapter.all_layer_names(model):
            block, linear = adapter.split_layer_name(name)
            rows, cols = model.get_submodule(name).weight.shape
            projection = linear.rsplit(".", 1)[-1]
            layers[name] = LayerInfo(block, adapter.kind(linear), int(rows), int(cols), projection)
        return cls(
            method=method,
            layers=layers,
            num_blocks=adapter.num_blocks(model),
            block_influence=tuple(float(x) for x in stats.block_influence),
            outlier_ratios={
                float(m): tuple(float(r) for r in block_outlier_ratios(loaded, stats, m))
                for m in outlier_thresholds
            },
            sparsity_range=sparsity_range,
            **_structure_info(loaded, stats),
        )

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (info.rows, info.cols) for name, info in self.layers.items()}

    @property
    def projections(self) -> list[str]:
        """The projections of a block, in model order."""
        return list(dict.fromkeys(info.projection for info in self.layers.values()))

    @property
    def block_of(self) -> dict[str, int]:
        return {name: info.block for name, info in self.layers.items()}

    @property
    def dense_linear_params(self) -> int:
        return sum(info.rows * info.cols for info in self.layers.values())

    def nonzeros(self, plan: Plan) -> int:
        """Decoder linear non-zeros ``plan`` leaves, from shapes alone (a sub-network's kept weights)."""
        if plan.structure is not None and self.dims is not None:
            shapes = resolve_blocks(plan.structure, plan.removed_blocks, self.dims)
            return expected_linear_nonzeros(plan, kept_layer_shapes(shapes, self.dims), self.block_of)
        return expected_linear_nonzeros(plan, self.layer_shapes, self.block_of)

    def sparsity(self, plan: Plan) -> float:
        return 1.0 - self.nonzeros(plan) / self.dense_linear_params

    def least_influential_blocks(self, count: int) -> list[int]:
        """The ``count`` blocks that change their input least (ShortGPT's removal order)."""
        order = sorted(range(self.num_blocks), key=lambda block: (self.block_influence[block], block))
        return sorted(order[:count])

    def target_distribution(self) -> FloatDistribution:
        """Targets on a grid of about one percent that lands on both ends of the range: candidates
        of one target share its exact budget, so most comparisons are at equal size."""
        low, high = self.sparsity_range
        steps = max(1, round((high - low) / TARGET_GRID))
        return FloatDistribution(low, high, step=round((high - low) / steps, 12))

    def on_target_grid(self, targets: Sequence[float]) -> list[float]:
        """Each of ``targets`` moved to the nearest point of :meth:`target_distribution`'s grid
        (the middle of 0.5-0.75 is 0.625, between two points): a baseline enqueued off the grid
        runs, but its parameters lie outside the distribution the study records, so no trial can
        be made from them (a refinement of it is)."""
        grid = self.target_distribution()
        return [round(grid.low + round((t - grid.low) / grid.step) * grid.step, 12) for t in targets]


def _structure_info(loaded: LoadedModel, stats: CalibrationStats) -> dict[str, object]:
    """``dims`` and ``unit_scores`` of a LLaMA-family model; nothing for other families."""
    try:
        dims = model_dims(loaded.model)
    except AutopruneError:
        return {}
    scores = {block: (tuple(heads.tolist()), tuple(ffn.tolist()))
              for block, (heads, ffn) in enumerate(unit_scores(loaded.model, stats))}
    return {"dims": dims, "unit_scores": scores}


class SearchSpace(ABC):
    """A family of plans: ``distributions`` says what Optuna samples, ``cast`` makes the plan.

    Subclasses that set ``name`` register themselves; :meth:`named` finds them, so adding a space
    is adding a module. ``baselines`` are the known allocations a study starts from, written as this space's
    own parameters so samplers learn from them like from any other trial.
    """

    name: ClassVar[str]
    #: Whether the space's plans have a size target (``params[TARGET]``) that casting lands on.
    has_target: ClassVar[bool] = True
    #: Whether the plans give layers unstructured sparsity, the allocation a finishing refinement
    #: moves between layers (not blocks removed alone, N:M patterns or a sub-network's widths).
    unstructured: ClassVar[bool] = True
    #: The targets searched when the config names none (fractions of the dense decoder linear
    #: weights removed): sub-networks lose quality at far smaller sizes than sparse layers.
    default_range: ClassVar[tuple[float, float]] = (0.4, 0.8)
    #: How far above its target a cast may land (a fraction of the dense decoder linear weights):
    #: sub-networks move in whole heads and channel steps, sparse layers in single weights.
    target_tolerance: ClassVar[float] = 0.005
    #: Whether the plans give tensors GGUF types: a study then minimizes its file's bytes
    #: (``gguf_bytes``) by default, and its context needs ``gguf``.
    quantized: ClassVar[bool] = False

    def applies_to(self, ctx: SpaceContext) -> bool:
        """Whether the space can cut the model ``ctx`` describes (every family, unless it says)."""
        return True

    @abstractmethod
    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        """The flat, static set of parameters of this space for the model in ``ctx``."""

    @abstractmethod
    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        """The plan that ``params`` (one value per distribution) stand for. Deterministic."""

    @abstractmethod
    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Labelled parameters of the standard allocations this space can express."""

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Labelled prior guesses that start the search beside the baselines, so a sampler refines
        structured allocations instead of waiting to stumble on them. None by default."""
        return {}

    _registry: ClassVar[dict[str, type[SearchSpace]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SearchSpace._registry[cls.name] = cls

    @staticmethod
    def named(name: str) -> SearchSpace:
        if name not in SearchSpace._registry:
            known = ", ".join(SearchSpace.available())
            raise AutopruneError(f"unknown search space {name!r} (known: {known})")
        return SearchSpace._registry[name]()

    @staticmethod
    def available() -> list[str]:
        return sorted(SearchSpace._registry)
