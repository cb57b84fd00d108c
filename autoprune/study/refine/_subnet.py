"""What a sub-network plan's refinement refuses: per-layer sparsity on top of its widths.

Candidates and the refined trial are measured as their sub-networks by the trial worker's own
:class:`~autoprune.pruner.Pruner` (:meth:`~autoprune.pruner.Pruner.subnet`), as search trials are.
"""

from __future__ import annotations

from autoprune.errors import AutopruneError
from autoprune.plan import Plan


def require_widths_only(plan: Plan) -> None:
    """Refuse, in one line, a sub-network plan that also prunes weights (per-layer sparsity on top
    of its widths), which sub-networks are not measured with."""
    if any(not spec.is_dense for spec in plan.layers.values()):
        raise AutopruneError(
            "refining a sub-network that also prunes weights of its kept blocks is not supported: "
            "refine its widths on a plan without per-layer sparsity"
        )
