"""ADMM must solve what it claims: the layer's reconstruction least squares for its mask, and a lower
reconstruction error than SparseGPT's single sweep on the same statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs, reconstruction_error

from autoprune.calibration import LinearStats
from autoprune.methods import ADMM, LayerJob, SparseGPT, admm_factors, admm_prune_columns_
from autoprune.plan import LayerSpec, NMPattern


def test_weights_solve_the_masked_least_squares() -> None:
    """Once the mask is fixed, the iterations converge to each row's exact optimum on its kept
    inputs: ``min (w - v)^T G (w - v)`` over ``v`` zero off the mask, with ``G`` the dampened
    Hessian the method builds (solved here directly, row by row)."""
    x = correlated_inputs(1024, 48, seed=7)
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(8))
    hessian = x.T @ x
    factors = admm_factors(hessian)
    columns = weight.T.contiguous()[None]
    admm_prune_columns_(columns, tuple(f[None] for f in factors), torch.full((1, 16), 0.5),
                        iterations=400, mask_iterations=10)
    pruned = columns[0].T
    scale, gram, _ = factors
    dampened = gram * scale[:, None] * scale[None, :]
    for row in range(16):
        kept = pruned[row] != 0
        exact = torch.linalg.solve(dampened[kept][:, kept], dampened[kept] @ weight[row])
        torch.testing.assert_close(pruned[row, kept], exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "spec", [LayerSpec(sparsity=0.5), LayerSpec(sparsity=0.7), LayerSpec(nm=NMPattern(n=2, m=4))]
)
def test_lower_reconstruction_error_than_sparsegpt(spec: LayerSpec) -> None:
    x = correlated_inputs(2048, 96, seed=0)
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    stats = LinearStats("g", (x * x).sum(0), x.T @ x, x.shape[0])
    job = [LayerJob("w", weight, stats, spec)]
    admm = reconstruction_error(weight, ADMM().prune(job)["w"], x)
    sparsegpt = reconstruction_error(weight, SparseGPT().prune(job)["w"], x)
    assert admm < 0.8 * sparsegpt


def test_batched_layers_match_one_at_a_time() -> None:
    xs = [correlated_inputs(512, 64, seed) for seed in (2, 3)]
    weights = [torch.randn(64, 32, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    factors = [admm_factors(x.T @ x) for x in xs]
    sparsity = torch.tensor([[0.6] * 16 + [0.3] * 16])
    batched = torch.stack(weights)
    admm_prune_columns_(batched, tuple(torch.stack(parts) for parts in zip(*factors)), sparsity.repeat(2, 1))
    for index in range(2):
        single = weights[index][None].clone()
        admm_prune_columns_(single, tuple(f[None] for f in factors[index]), sparsity)
        torch.testing.assert_close(batched[index], single[0], rtol=1e-4, atol=1e-5)


def test_mask_schedule_must_fit_the_iterations() -> None:
    factors = tuple(f[None] for f in admm_factors(torch.eye(8)))
    with pytest.raises(ValueError, match="mask_iterations"):
        admm_prune_columns_(
            torch.randn(1, 8, 4), factors, torch.full((1, 4), 0.5), iterations=5, mask_iterations=6
        )
