"""Pruning methods: one small module each behind :class:`PruningMethod`."""

from autoprune.methods._base import LayerJob, PruningMethod
from autoprune.methods._masks import (
    keep_mask_from_order,
    lowest_per_row,
    nm_keep_mask,
    prune_count,
    prune_order,
)
from autoprune.methods._scored import ScoredPruningMethod
from autoprune.methods._stacked import StackedRowsMethod
from autoprune.methods.admm import ADMM, admm_factors, admm_prune_columns_
from autoprune.methods.magnitude import Magnitude, magnitude_scores
from autoprune.methods.sparsegpt import (
    SparseGPT,
    inverse_hessian_factor,
    sparsegpt_prune,
    sparsegpt_prune_columns_,
)
from autoprune.methods.wanda import Wanda, wanda_scores

__all__ = [
    "ADMM",
    "LayerJob",
    "Magnitude",
    "PruningMethod",
    "ScoredPruningMethod",
    "SparseGPT",
    "StackedRowsMethod",
    "Wanda",
    "admm_factors",
    "admm_prune_columns_",
    "inverse_hessian_factor",
    "keep_mask_from_order",
    "lowest_per_row",
    "magnitude_scores",
    "nm_keep_mask",
    "prune_count",
    "prune_order",
    "sparsegpt_prune",
    "sparsegpt_prune_columns_",
    "wanda_scores",
]
