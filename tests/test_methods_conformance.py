"""Every pruning method passes the same contract (like Optuna's sampler conformance suite)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_jobs, with_spec

from autoprune.methods import LayerJob, PruningMethod
from autoprune.plan import LayerSpec, NMPattern

METHODS = PruningMethod.available()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.93])
def test_every_row_loses_exactly_its_share(method: str, sparsity: float) -> None:
    jobs = with_spec(make_jobs(), LayerSpec(sparsity=sparsity))
    pruned = PruningMethod.named(method).prune(jobs)
    for job in jobs:
        cols = job.weight.shape[1]
        zeros_per_row = (pruned[job.name] == 0).sum(dim=1)
        assert torch.all((zeros_per_row - round(sparsity * cols)).abs() <= 1), job.name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_groups_hold_at_most_n_nonzeros(method: str, pattern: str) -> None:
    nm = NMPattern.parse(pattern)
    jobs = with_spec(make_jobs(), LayerSpec(nm=nm))
    pruned = PruningMethod.named(method).prune(jobs)
    for job in jobs:
        groups = (pruned[job.name] != 0).reshape(-1, nm.m).sum(dim=1)
        assert int(groups.max()) <= nm.n
        assert int(groups.min()) == nm.n  # random weights: nothing pruned beyond the pattern


@pytest.mark.parametrize("method", METHODS)
def test_dense_spec_returns_the_dense_weight(method: str) -> None:
    jobs = make_jobs()
    pruned = PruningMethod.named(method).prune(jobs)
    for job in jobs:
        assert torch.equal(pruned[job.name], job.weight)


@pytest.mark.parametrize("method", METHODS)
def test_dense_weights_are_never_modified(method: str) -> None:
    jobs = with_spec(make_jobs(), LayerSpec(sparsity=0.6))
    before = [job.weight.clone() for job in jobs]
    PruningMethod.named(method).prune(jobs)
    for job, original in zip(jobs, before, strict=True):
        assert torch.equal(job.weight, original)


@pytest.mark.parametrize("method", METHODS)
def test_reused_state_gives_the_same_result_as_a_fresh_instance(method: str) -> None:
    """Cached per-layer state (sorted scores, Hessian factors) must not leak between plans."""
    jobs = make_jobs()
    reused = PruningMethod.named(method)
    for sparsity in (0.7, 0.3, 0.5):
        reused.prune(with_spec(jobs, LayerSpec(sparsity=sparsity)))
    again = reused.prune(with_spec(jobs, LayerSpec(sparsity=0.7)))
    fresh = PruningMethod.named(method).prune(with_spec(jobs, LayerSpec(sparsity=0.7)))
    for job in jobs:
        assert torch.equal(again[job.name], fresh[job.name])


@pytest.mark.parametrize("method", METHODS)
def test_layers_can_take_different_targets_in_one_call(method: str) -> None:
    jobs = make_jobs()
    specs = [LayerSpec(sparsity=0.2), LayerSpec(sparsity=0.8), LayerSpec(nm=NMPattern(n=2, m=4))]
    mixed = [LayerJob(j.name, j.weight, j.stats, s) for j, s in zip(jobs, specs, strict=True)]
    pruned = PruningMethod.named(method).prune(mixed)
    densities = [float((pruned[j.name] != 0).float().mean()) for j in jobs]
    assert densities == pytest.approx([0.8, 0.2, 0.5], abs=0.02)


def test_unknown_method_is_a_clear_error() -> None:
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match="unknown pruning method 'obs'"):
        PruningMethod.named("obs")
