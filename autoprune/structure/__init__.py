"""Sub-networks: fewer heads, KV groups, FFN channels, sub-blocks and blocks, physically cut.

The plan part (:class:`Structure`, schema v2) is plain data; structured methods choose what goes
from the cached calibration statistics; :func:`build_subnet` makes the smaller model, whose kept
layers a plan may also prune (:func:`kept_inputs`).
"""

from autoprune.structure._build import (
    BlockCut,
    CutCache,
    CutStore,
    build_subnet,
    choose_cuts,
    decoder_linear_params,
    kept_layer_shapes,
    model_dims,
    subnet_config,
    unit_scores,
)
from autoprune.structure._export import save_subnet
from autoprune.structure._sparse import check_pruned_layers, kept_inputs, kept_layer_inputs, restricted
from autoprune.structure._methods import StructuredMethod
from autoprune.structure._schema import (
    DEFAULT_CORRECTION,
    DEFAULT_STRUCTURED_METHOD,
    BlockShape,
    BlockWidths,
    ModelDims,
    Structure,
    StructuredMethodName,
    StructureRequest,
    heads_to_groups,
    resolve_blocks,
)
from autoprune.structure._select import (
    UnitLayout,
    activation_scores,
    least_squares_correction,
    obs_select,
    select_by_scores,
    weighted_scores,
)

__all__ = [
    "DEFAULT_CORRECTION",
    "DEFAULT_STRUCTURED_METHOD",
    "BlockCut",
    "CutCache",
    "CutStore",
    "BlockShape",
    "BlockWidths",
    "ModelDims",
    "Structure",
    "StructuredMethod",
    "StructuredMethodName",
    "StructureRequest",
    "UnitLayout",
    "activation_scores",
    "build_subnet",
    "check_pruned_layers",
    "choose_cuts",
    "decoder_linear_params",
    "heads_to_groups",
    "kept_inputs",
    "kept_layer_inputs",
    "kept_layer_shapes",
    "least_squares_correction",
    "model_dims",
    "obs_select",
    "resolve_blocks",
    "restricted",
    "select_by_scores",
    "subnet_config",
    "unit_scores",
    "save_subnet",
    "weighted_scores",
]
