"""Helpers that turn one target sparsity into a per-layer map: uniform, and OWL.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity") gives blocks with more activation
outliers less sparsity: a block's outlier ratio is the share of its Wanda scores above ``M`` times
their mean; ratios are scaled to ``[0, 2*lambda]``, centred, and subtracted from the target.
"""

from __future__ import annotations

import torch

from autoprune.calibration import CalibrationStats
from autoprune.errors import AutopruneError
from autoprune.methods import wanda_scores
from autoprune.models import LoadedModel
from autoprune.plan import LayerSpec, MethodName, NMPattern, Plan


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise AutopruneError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def uniform_plan(
    loaded: LoadedModel,
    method: MethodName,
    sparsity: float = 0.0,
    nm: NMPattern | None = None,
) -> Plan:
    """Every decoder linear layer at the same sparsity (or the same N:M pattern)."""
    spec = LayerSpec(nm=nm) if nm is not None else LayerSpec(sparsity=check_sparsity(sparsity))
    names = loaded.adapter.all_layer_names(loaded.model)
    return Plan(method=method, layers={name: spec for name in names})


def block_outlier_ratios(
    loaded: LoadedModel, stats: CalibrationStats, outlier_threshold: float
) -> torch.Tensor:
    """Per block, the share of Wanda scores above ``outlier_threshold`` times their layer's mean."""
    adapter, model = loaded.adapter, loaded.model
    ratios = []
    for block in range(adapter.num_blocks(model)):
        outliers, total = 0, 0
        for linear in adapter.linear_names:
            name = adapter.layer_name(block, linear)
            scores = wanda_scores(model.get_submodule(name).weight, stats.layer(name).act_norm)
            outliers += int((scores > outlier_threshold * scores.mean()).sum())
            total += scores.numel()
        ratios.append(outliers / total)
    return torch.tensor(ratios, dtype=torch.float64)


def owl_block_sparsities(
    outlier_ratios: torch.Tensor, target: float, lam: float
) -> list[float]:
    """OWL's rule on precomputed outlier ratios; blocks are equal in size, so the mean is kept."""
    check_sparsity(target)
    spread = outlier_ratios.max() - outlier_ratios.min()
    scaled = (
        (outlier_ratios - outlier_ratios.min()) / spread * 2 * lam
        if spread > 0
        else torch.zeros_like(outlier_ratios)
    )
    sparsities = (target - (scaled - scaled.mean())).clamp(0.0, 0.99)
    return [float(s) for s in sparsities]


def owl_plan(
    loaded: LoadedModel,
    stats: CalibrationStats,
    method: MethodName,
    target: float,
    outlier_threshold: float = 5.0,
    lam: float = 0.08,
) -> Plan:
    """OWL's non-uniform allocation at ``target`` with its hyperparameters ``M`` and ``lambda``."""
    ratios = block_outlier_ratios(loaded, stats, outlier_threshold)
    return block_plan(loaded, method, owl_block_sparsities(ratios, target, lam))


def block_plan(loaded: LoadedModel, method: MethodName, block_sparsities: list[float]) -> Plan:
    """Every linear layer of block ``i`` at ``block_sparsities[i]``."""
    adapter = loaded.adapter
    layers = {
        adapter.layer_name(block, linear): LayerSpec(sparsity=sparsity)
        for block, sparsity in enumerate(block_sparsities)
        for linear in adapter.linear_names
    }
    return Plan(method=method, layers=layers)
