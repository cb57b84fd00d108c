"""Search spaces: each a flat set of Optuna distributions and a cast into a pruning plan.

    space = SearchSpace.named("layerwise")
    ctx = SpaceContext.from_model(loaded, stats, "sparsegpt", (0.4, 0.8))
    plan = space.cast(trial.params, ctx)   # params sampled from space.distributions(ctx)

One small module per space; a new space is a subclass with a ``name``.
"""

from search_spaces._base import (
    OWL_THRESHOLDS,
    TARGET,
    LayerInfo,
    Params,
    SearchSpace,
    SpaceContext,
)
from search_spaces._budget import MAX_LAYER_SPARSITY, project_to_budget
from search_spaces._depth import DepthLayerwiseSpace, DepthSpace
from search_spaces._depth_ramp import DepthRampSpace
from search_spaces._gguf import GGUFSpace, SubnetGGUFSpace
from search_spaces._layerwise import LayerwiseSpace
from search_spaces._nm import NMSpace
from search_spaces._owl import OWLSpace
from search_spaces._profile import ProfileSpace
from search_spaces._subnet import SubnetSpace, subnet_widths
from search_spaces._uniform import UniformSpace

__all__ = [
    "MAX_LAYER_SPARSITY",
    "OWL_THRESHOLDS",
    "TARGET",
    "DepthLayerwiseSpace",
    "DepthRampSpace",
    "DepthSpace",
    "GGUFSpace",
    "LayerInfo",
    "LayerwiseSpace",
    "NMSpace",
    "OWLSpace",
    "Params",
    "ProfileSpace",
    "SearchSpace",
    "SpaceContext",
    "SubnetGGUFSpace",
    "SubnetSpace",
    "UniformSpace",
    "subnet_widths",
    "project_to_budget",
]
