"""The model a sub-network plan stands for, as refinement measures it.

One function, :func:`subnet_model`, is where a plan with a structure becomes a model to measure:
the sub-network :func:`~autoprune.structure.build_subnet` cuts from the dense model and the cached
statistics. :class:`SubnetPruner` gives the trial worker the same model for the refined plan's
final measurement (``TrialWorker.run(request, pruner)``), so candidates and the recorded trial are
measured alike. Should :meth:`Pruner.applied` build sub-networks itself, both become that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.pruner import Pruner
from autoprune.structure import build_subnet


def subnet_model(pruner: Pruner, plan: Plan) -> torch.nn.Module:
    """The sub-network of ``plan`` (heads, channels, sub-blocks and blocks cut), on the dense
    model's device; refused in one line where the plan also prunes weights of the blocks it keeps
    (sparsity on top of a sub-network is not measured this way)."""
    if plan.structure is None:
        raise AutopruneError("the plan has no structure: it is pruned, not cut into a sub-network")
    require_widths_only(plan)
    model = pruner.loaded.model
    subnet = build_subnet(model, pruner.stats, plan.structure, plan.removed_blocks)
    return subnet.to(next(model.parameters()).device)


def require_widths_only(plan: Plan) -> None:
    """Refuse, in one line, a sub-network plan that also prunes weights (per-layer sparsity on top
    of its widths), which :func:`subnet_model` does not measure."""
    if any(not spec.is_dense for spec in plan.layers.values()):
        raise AutopruneError(
            "refining a sub-network that also prunes weights of its kept blocks is not supported: "
            "refine its widths on a plan without per-layer sparsity"
        )


class SubnetPruner(Pruner):
    """A :class:`Pruner` whose :meth:`applied` measures a plan with a structure as its sub-network
    (:func:`subnet_model`); plans without one are pruned as always."""

    @contextmanager
    def applied(self, plan: Plan) -> Iterator[torch.nn.Module]:
        if plan.structure is None:
            with super().applied(plan) as model:
                yield model
        else:
            yield subnet_model(self, plan)
