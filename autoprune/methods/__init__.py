"""Pruning methods: one small module each behind :class:`PruningMethod`."""

from autoprune.methods._base import LayerJob, PruningMethod
from autoprune.methods._masks import keep_mask_from_order, nm_keep_mask, prune_count, prune_order
from autoprune.methods._scored import ScoredPruningMethod
from autoprune.methods.magnitude import Magnitude, magnitude_scores
from autoprune.methods.sparsegpt import (
    SparseGPT,
    inverse_hessian_factor,
    sparsegpt_prune,
    sparsegpt_prune_columns_,
)
from autoprune.methods.wanda import Wanda, wanda_scores

__all__ = [
    "LayerJob",
    "Magnitude",
    "PruningMethod",
    "ScoredPruningMethod",
    "SparseGPT",
    "Wanda",
    "inverse_hessian_factor",
    "keep_mask_from_order",
    "magnitude_scores",
    "nm_keep_mask",
    "prune_count",
    "prune_order",
    "sparsegpt_prune",
    "sparsegpt_prune_columns_",
    "wanda_scores",
]
