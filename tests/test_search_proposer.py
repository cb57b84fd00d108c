"""The search takes its proposer from the caller, the way it takes an executor: a proposer, or a
factory the driver calls once the space's context is known; ``predictor: on`` without one is refused
before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import TRIALS_ONLY
from optuna.distributions import CategoricalDistribution

from autoprune.errors import AutopruneError
from autoprune.study import (
    InProcessExecutor,
    SearchConfig,
    SearchSetup,
    load_existing_study,
    run_search,
)
from search_spaces import SearchSpace


def small_config(model_dir: Path, data_dir: Path, folder: Path, **overrides) -> SearchConfig:
    settings = dict(
        model=str(model_dir), data=str(data_dir), storage=f"sqlite:///{folder / 'study.db'}",
        study="proposed", trials=6, population=2, space="layerwise", method="magnitude",
        sparsity_range=(0.3, 0.7), eval_windows=1, min_windows=1, seq_len=32, calib_samples=4,
        cache_dir=str(folder / "cache"), early_stop_margin=None, seeded=False,
        baseline_targets=[0.5], **TRIALS_ONLY,
    )
    return SearchConfig(**{**settings, **overrides})


def test_predictor_on_without_a_proposer_or_with_two_is_refused_before_anything_is_written(
    tiny_llama_dir, data_dir, tmp_path
):
    config = small_config(tiny_llama_dir, data_dir, tmp_path, predictor="on")
    with pytest.raises(AutopruneError, match="proposer_factory=predictors.PredictorProposer.for_search"):
        run_search(config, progress=False)
    with pytest.raises(AutopruneError, match="not both"):
        run_search(config, proposer=lambda study, n: [], proposer_factory=lambda setup: None,
                   progress=False)
    assert list(tmp_path.iterdir()) == []  # no storage file, no calibration cache


def test_the_factory_gets_the_search_setup_and_its_proposals_are_measured(
    tiny_llama_dir, data_dir, tmp_path
):
    config = small_config(tiny_llama_dir, data_dir, tmp_path)
    setups: list[SearchSetup] = []
    asked: list[int] = []

    def factory(setup: SearchSetup):
        setups.append(setup)
        params = lowest(setup.distributions)

        def proposer(study: optuna.Study, n: int) -> list:
            asked.append(n)
            return [(params, {"why": "lowest"})]

        return proposer

    summary = run_search(config, proposer_factory=factory, progress=False)
    assert len(setups) == 1  # built once, before the first trial
    setup = setups[0]
    assert setup.config is config and setup.progress is False
    assert isinstance(setup.executor, InProcessExecutor)  # the run's own, its worker's model loaded
    assert setup.ctx.dense_linear_params == setup.executor.worker.pruner.dense_linear_params
    space = SearchSpace.named(config.space)
    assert setup.distributions == space.distributions(setup.ctx)
    assert asked and set(asked) == {1}  # one free slot in process
    study = load_existing_study(config.storage, config.study)
    proposed = [t for t in study.trials if t.user_attrs.get("proposed")]
    assert proposed and proposed[0].user_attrs["why"] == "lowest"
    assert proposed[0].params == pytest.approx(lowest(setup.distributions))
    assert summary.finished == config.trials


def lowest(distributions: dict) -> dict:
    """The low end of every distribution (the first choice of a categorical one): a plan no
    baseline makes."""
    return {
        name: dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
        for name, dist in distributions.items()
    }
