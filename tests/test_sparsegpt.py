"""SparseGPT's weight update must pay for itself: lower reconstruction error than its own mask
applied without the update."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs, reconstruction_error

from autoprune.calibration import LinearStats
from autoprune.methods import LayerJob, SparseGPT, prune_count
from autoprune.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune, sparsegpt_prune_columns_
from autoprune.plan import LayerSpec, NMPattern


def test_update_lowers_error_against_the_same_mask() -> None:
    x = correlated_inputs(2048, 96, seed=0)
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    stats = LinearStats("g", (x * x).sum(0), x.T @ x, x.shape[0])
    for spec in (LayerSpec(sparsity=0.5), LayerSpec(sparsity=0.7), LayerSpec(nm=NMPattern(n=2, m=4))):
        updated = SparseGPT().prune([LayerJob("w", weight, stats, spec)])["w"]
        mask_only = weight * (updated != 0)
        with_update = reconstruction_error(weight, updated, x)
        without_update = reconstruction_error(weight, mask_only, x)
        assert with_update < 0.9 * without_update, spec


def test_batched_layers_match_one_at_a_time() -> None:
    """Stacking blocks along the batch dimension is an optimisation, not a different algorithm."""
    xs = [correlated_inputs(512, 64, seed) for seed in (2, 3)]
    weights = [torch.randn(32, 64, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    factors = [inverse_hessian_factor(2 * x.T @ x / len(x)) for x in xs]
    sparsity = torch.full((1, 32), 0.6)
    batched = sparsegpt_prune(torch.stack(weights), torch.stack(factors), sparsity.repeat(2, 1))
    for index in range(2):
        single = sparsegpt_prune(weights[index][None], factors[index][None], sparsity)
        torch.testing.assert_close(batched[index], single[0], rtol=1e-4, atol=1e-5)


def test_selection_breaks_ties_by_column_like_a_stable_sort():
    """Rows full of equal saliencies (quantized weights) lose exactly their count, the lowest
    first and, among equals, the leftmost: the mask a stable sort gives. An identity factor makes
    the updates vanish, so the pruned weights are exactly the zeros of the result."""
    generator = torch.Generator().manual_seed(6)
    magnitude = torch.randint(1, 4, (3, 24, 32), generator=generator).float()
    weight = magnitude * (torch.randint(0, 2, (3, 24, 32), generator=generator) * 2 - 1)
    identity = torch.eye(32).expand(3, 32, 32).contiguous()
    sparsity = torch.tensor([0.25, 0.5, 0.75]).repeat_interleave(8).expand(3, 24).contiguous()
    pruned = sparsegpt_prune(weight, identity, sparsity, mask_block=32) == 0
    order = torch.argsort(weight**2, dim=2, stable=True)
    counts = torch.floor(sparsity * 32 + 0.5).long()
    expected = torch.zeros_like(pruned)
    for batch in range(3):
        for row in range(24):
            expected[batch, row, order[batch, row, : counts[batch, row]]] = True
    assert torch.equal(pruned, expected)


def naive_sparsegpt(weight: torch.Tensor, hinv: torch.Tensor, sparsity: float, mask_block: int) -> torch.Tensor:
    """The textbook sweep on one matrix: every column updates all later ones at once, no lazy
    batching; the mask of each block is chosen per row on the weights as updated so far."""
    w = weight.clone()
    rows, cols = w.shape
    row_sparsity = torch.full((rows,), sparsity)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for column in range(cols):
        if column % mask_block == 0:
            end = min(column + mask_block, cols)
            saliency = w[:, column:end] ** 2 / torch.diagonal(hinv)[column:end] ** 2
            order = torch.argsort(saliency, dim=1, stable=True)
            count = prune_count(row_sparsity, end) - prune_count(row_sparsity, column)
            for row in range(rows):
                pruned[row, column + order[row, : count[row]]] = True
        error = w[:, column] * pruned[:, column] / hinv[column, column]
        w[:, column:] -= error[:, None] * hinv[column, column:][None, :]
    return w.masked_fill(pruned, 0.0)


def test_lazy_updates_are_exact_whatever_the_block_sizes() -> None:
    """Both tiers of lazy updates (within a mask block, beyond it) only reorder the arithmetic."""
    x = correlated_inputs(512, 64, seed=7)
    factor = inverse_hessian_factor(2 * x.T @ x / len(x))
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    expected = naive_sparsegpt(weight, factor, 0.6, mask_block=32)
    sparsity = torch.full((1, 24), 0.6)
    for update_block in (1, 4, 8, 32):
        result = sparsegpt_prune(weight[None], factor[None], sparsity, mask_block=32, update_block=update_block)
        torch.testing.assert_close(result[0], expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(result[0] == 0, expected == 0)


def test_the_pure_form_leaves_its_input_and_the_in_place_form_needs_column_major() -> None:
    weight = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(9))
    before = weight.clone()
    identity = torch.eye(16).expand(2, 16, 16).contiguous()
    sparsity = torch.full((2, 8), 0.5)
    pruned = sparsegpt_prune(weight, identity, sparsity)
    assert torch.equal(weight, before)
    columns = weight.transpose(1, 2).contiguous()
    sparsegpt_prune_columns_(columns, identity, sparsity)
    assert torch.equal(columns.transpose(1, 2), pruned)
    with pytest.raises(ValueError, match="contiguous float32"):
        sparsegpt_prune_columns_(weight.transpose(1, 2), identity, sparsity)
