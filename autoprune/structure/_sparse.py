"""Per-layer sparsity on a sub-network's kept weights: which layers a plan may prune, their kept
shapes, and the statistics of their kept inputs.

A sub-network plan may name per-layer sparsity (or N:M) for layers of the sub-blocks it keeps,
by their names in the dense model. The sub-network is cut first; those layers are then pruned by
the plan's method like any layer, from the cached statistics restricted to the inputs the cut
keeps: ``o_proj`` reads only the kept heads' outputs and ``down_proj`` only the kept channels,
while the other projections read the block's unchanged hidden state. A layer's sparsity is a
fraction of its kept weights.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from autoprune.calibration import CalibrationStats, LinearStats
from autoprune.errors import AutopruneError
from autoprune.models import LlamaFamilyAdapter
from autoprune.structure._build import CutCache, choose_cuts, kept_layer_shapes, model_dims
from autoprune.structure._schema import ModelDims, resolve_blocks

if TYPE_CHECKING:  # the plan module imports this package's schema
    from autoprune.plan import Plan

_ADAPTER = LlamaFamilyAdapter()


def check_pruned_layers(plan: Plan, dims: ModelDims) -> None:
    """A one-line error naming a layer ``plan`` prunes that its sub-network does not keep (removed
    block, dropped sub-block) or whose kept inputs an N:M pattern does not divide."""
    kept = kept_layer_shapes(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)
    for name, spec in sorted(plan.layers.items()):
        if spec.is_dense:
            continue
        if name not in kept:
            raise AutopruneError(f"the plan prunes {name}, which its sub-network does not keep")
        if spec.nm is not None and kept[name][1] % spec.nm.m:
            raise AutopruneError(
                f"the plan prunes {name} {spec.nm.n}:{spec.nm.m}, but its sub-network keeps "
                f"{kept[name][1]} inputs"
            )


def kept_inputs(
    model: PreTrainedModel, stats: CalibrationStats, plan: Plan, cache: CutCache | None = None
) -> dict[str, tuple[str, LinearStats]]:
    """For each layer ``plan`` prunes on top of its sub-network: the layer's name in the
    sub-network (blocks renumbered) and the statistics of the inputs it keeps."""
    dims = model_dims(model)
    check_pruned_layers(plan, dims)
    pruned = [name for name, spec in plan.layers.items() if not spec.is_dense]
    return kept_layer_inputs(model, stats, plan, pruned, cache, dims)


def kept_layer_inputs(
    model: PreTrainedModel,
    stats: CalibrationStats,
    plan: Plan,
    names: list[str] | None = None,
    cache: CutCache | None = None,
    dims: ModelDims | None = None,
) -> dict[str, tuple[str, LinearStats]]:
    """For each of ``names`` (dense names of layers ``plan``'s sub-network keeps; None: every kept
    layer): its name in the sub-network and the statistics of the inputs it keeps."""
    dims = dims or model_dims(model)
    cuts = choose_cuts(model, stats, plan.structure, plan.removed_blocks, cache)
    position = {cut.index: new for new, cut in enumerate(cuts)}
    if names is None:
        names = list(kept_layer_shapes(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims))
    heads = dims.head_layout
    result = {}
    for name in names:
        index, layer = _ADAPTER.split_layer_name(name)
        cut = cuts[position[index]]
        inputs = stats.layer(name)
        if layer == "self_attn.o_proj" and cut.shape.heads < dims.num_heads:
            inputs = restricted(inputs, heads.columns(cut.heads))
        elif layer == "mlp.down_proj" and cut.shape.ffn < dims.ffn:
            inputs = restricted(inputs, cut.channels)
        result[name] = (_ADAPTER.layer_name(position[index], layer), inputs)
    return result


def restricted(stats: LinearStats, columns: list[int]) -> LinearStats:
    """``stats`` of the input channels ``columns`` alone, under a group name of their own (methods
    keep what they derive from a group's statistics by its name)."""
    index = torch.tensor(columns)
    digest = hashlib.sha1(index.numpy().tobytes()).hexdigest()[:16]
    return LinearStats(
        group=f"{stats.group}[{len(columns)} kept:{digest}]",
        sq_norm=stats.sq_norm[index],
        xtx=stats.xtx[index][:, index],
        n_tokens=stats.n_tokens,
    )
