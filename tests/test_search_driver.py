"""The ask/tell driver on the tiny LLaMA: baselines first, complete records, a front of complete
trials only, resumption, refused setting changes, every trial status, constraints, multi-fidelity
thresholds and the proposer hook (the last ones through a scripted executor)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
import pytest
from conftest import copy_search, tiny_config
from optuna.trial import TrialState

from autoprune import CalibrationConfig, prepare
from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.study import (
    Executor,
    TrialRequest,
    TrialResult,
    TrialWorker,
    front_size,
    front_trials,
    pareto_trials,
    run_search,
    study_settings,
)
from autoprune.measure import kl_to_reference, perplexity, window_losses
from search_spaces import SearchSpace, SpaceContext

RECORD_KEYS = {
    "plan", "plan_summary", "expected_nonzeros", "stop_above", "status", "ppl", "kl", "quality",
    "size", "windows", "seconds", "worker",
}


@pytest.fixture(scope="module")
def finished_source(tiny_llama_dir, data_dir, tmp_path_factory):
    """A finished search, run once for the module; tests get copies (:func:`finished`)."""
    folder = tmp_path_factory.mktemp("driver")
    config = tiny_config(tiny_llama_dir, data_dir, folder)
    return folder, config, run_search(config, progress=False)


@pytest.fixture
def finished(finished_source, tmp_path):
    """This test's own copy of the finished study: trials it adds, no other test counts."""
    folder, config, summary = finished_source
    config = copy_search(folder, tmp_path / "driver", config)
    return config, summary, optuna.load_study(study_name=config.study, storage=config.storage)


def test_baselines_run_first_and_the_front_holds_complete_trials(finished):
    config, summary, study = finished
    labels = [t.user_attrs.get("baseline") for t in study.trials[:6]]
    assert labels == [f"{kind}@{t:.2f}" for t in (0.3, 0.5, 0.7) for kind in ("uniform", "owl")]
    assert summary.finished == config.trials == len(study.trials)
    assert summary.front and len(summary.front) == len(front_trials(study))
    assert all(t.state == TrialState.COMPLETE for t in front_trials(study))
    assert {row["trial"] for row in summary.front} == {t.number for t in study.best_trials}


def test_every_trial_records_plan_size_quality_and_timings(finished):
    config, _, study = finished
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        assert RECORD_KEYS <= attrs.keys(), RECORD_KEYS - attrs.keys()
        plan = Plan.model_validate(attrs["plan"])
        assert attrs["plan_summary"] == plan.summary()
        assert trial.values[0] == attrs["size"]["linear_nonzeros"] == attrs["expected_nonzeros"]
        assert trial.values[1] == attrs["quality"] == attrs["ppl"]
        assert attrs["windows"] == config.eval_windows
        assert {"prune", "evaluate", "bookkeeping", "total"} <= attrs["seconds"].keys()
        if "target" in trial.params:
            assert attrs["size"]["sparsity"] == pytest.approx(trial.params["target"], abs=0.005)
    settings = study_settings(study).stored()
    assert settings["space"] == "layerwise" and "sqlite" not in json.dumps(settings)


def test_a_rerun_with_a_larger_budget_continues_the_study(finished):
    config, _, study = finished
    before = {t.number: t.values for t in study.trials}
    summary = run_search(config.model_copy(update={"trials": 12}), progress=False)
    study = optuna.load_study(study_name=config.study, storage=config.storage)
    assert summary.finished == 12 and summary.resumed
    assert {n: v for n, v in ((t.number, t.values) for t in study.trials) if n in before} == before
    params = [json.dumps(t.params, sort_keys=True) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(params) == len(set(params))


def test_changed_settings_are_refused_before_anything_is_written(finished):
    config, _, study = finished
    count = len(study.trials)
    with pytest.raises(AutopruneError, match="eval_windows"):
        run_search(config.model_copy(update={"eval_windows": 4, "trials": 30}), progress=False)
    assert len(optuna.load_study(study_name=config.study, storage=config.storage).trials) == count


class ScriptedExecutor(Executor):
    """Returns scripted results, two in flight and out of order, recording every request."""

    def __init__(self, ctx: SpaceContext, script) -> None:
        self.ctx, self.script = ctx, script
        self.requests: list[TrialRequest] = []
        self.pending: list[TrialRequest] = []

    @property
    def capacity(self) -> int:
        return 2

    def submit(self, request: TrialRequest) -> None:
        self.requests.append(request)
        self.pending.append(request)

    def results(self, timeout=None) -> list[TrialResult]:
        done, self.pending = list(reversed(self.pending)), []
        return [self._result(request) for request in done]

    def in_flight(self) -> int:
        return len(self.pending)

    def _result(self, request: TrialRequest) -> TrialResult:
        nonzeros = self.ctx.nonzeros(request.plan)
        size = {"linear_nonzeros": nonzeros, "sparsity": 1 - nonzeros / self.ctx.dense_linear_params}
        status, ppl = self.script(request.number, nonzeros)
        if status == "failed":
            return TrialResult(request.number, "failed", error="RuntimeError: out of memory")
        return TrialResult(request.number, status, ppl, ppl, windows=3, size=size)


@pytest.fixture(scope="module")
def tiny_ctx(tiny_llama_dir, data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ctx-cache")
    calibration = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    loaded, stats, _ = prepare(str(tiny_llama_dir), calibration, cache, False)
    return SpaceContext.from_model(loaded, stats, "wanda", (0.3, 0.7)), cache


def scripted_run(tiny_llama_dir, data_dir, tmp_path, tiny_ctx, script, proposer=None, **overrides):
    ctx, cache = tiny_ctx
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, space="uniform", cache_dir=str(cache), **overrides)
    executor = ScriptedExecutor(ctx, script)
    summary = run_search(config, executor=executor, progress=False, proposer=proposer)
    return summary, optuna.load_study(study_name=config.study, storage=config.storage), executor


def test_every_status_is_recorded_and_only_complete_trials_reach_the_front(
    tiny_llama_dir, data_dir, tmp_path, tiny_ctx
):
    statuses = {3: ("collapsed", float("inf")), 4: ("failed", 0.0), 5: ("stopped_early", 500.0)}
    summary, study, _ = scripted_run(
        tiny_llama_dir, data_dir, tmp_path, tiny_ctx,
        lambda number, nonzeros: statuses.get(number, ("complete", 1e-3 * nonzeros)),
        trials=8,
    )
    states = {t.number: (t.state, t.user_attrs.get("reason"), t.user_attrs["status"]) for t in study.trials}
    assert states[3] == (TrialState.FAIL, "collapsed", "collapsed")
    assert states[4] == (TrialState.FAIL, "RuntimeError: out of memory", "failed")
    assert states[5] == (TrialState.PRUNED, None, "stopped_early")
    assert study.trials[3].user_attrs["ppl"] is None
    assert {3, 4, 5}.isdisjoint(row["trial"] for row in summary.front)
    assert (summary.complete, summary.stopped_early, summary.failed) == (5, 1, 2)


def test_trials_run_on_a_write_ahead_file_and_the_search_leaves_a_plain_one(
    tiny_llama_dir, data_dir, tmp_path, tiny_ctx
):
    path = tmp_path / "study.db"
    modes = []

    def script(number, nonzeros):
        with sqlite3.connect(path) as connection:
            modes.append(connection.execute("PRAGMA journal_mode").fetchone()[0])
        return "complete", 1e-3 * nonzeros

    scripted_run(tiny_llama_dir, data_dir, tmp_path, tiny_ctx, script, trials=4)
    assert modes == ["wal"] * 4
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(f"{path}-wal").exists()


def test_constraints_are_set_and_the_front_is_feasible(tiny_llama_dir, data_dir, tmp_path, tiny_ctx):
    summary, study, _ = scripted_run(
        tiny_llama_dir, data_dir, tmp_path, tiny_ctx,
        lambda number, nonzeros: ("complete", 1e-3 * nonzeros),
        trials=6, max_ppl=80.0,
    )
    for trial in study.trials:
        assert trial.constraints["max_ppl"] == pytest.approx(trial.values[1] - 80.0)
    assert summary.front and all(row["ppl"] <= 80.0 for row in summary.front)


@pytest.mark.parametrize("objective", ["ppl", "kl"])
def test_thresholds_follow_the_front_and_spare_baselines(
    tiny_llama_dir, data_dir, tmp_path, tiny_ctx, objective
):
    _, study, executor = scripted_run(
        tiny_llama_dir, data_dir, tmp_path, tiny_ctx,
        lambda number, nonzeros: ("complete", 1e-3 * nonzeros),
        trials=8, early_stop_margin=1.5, objective=objective,
    )
    trials = {t.number: t for t in study.trials}
    for request in executor.requests:
        trial = trials[request.number]
        if "baseline" in trial.user_attrs:
            assert request.stop_above is None
            continue
        nonzeros = trial.user_attrs["expected_nonzeros"]
        known = [  # the front the driver knew when it asked for this trial
            t.values[1] for t in study.get_trials(states=(TrialState.COMPLETE,))
            if t.datetime_complete <= trial.datetime_start and t.values[0] <= nonzeros
        ]
        assert request.stop_above == (pytest.approx(1.5 * min(known)) if known else None)
    assert any(r.stop_above is not None for r in executor.requests)


def test_proposed_candidates_are_enqueued_and_measured(tiny_llama_dir, data_dir, tmp_path, tiny_ctx):
    calls = []

    def proposer(study, n):
        calls.append(n)
        return [{"target": 0.55}] if len(calls) == 1 else []

    _, study, _ = scripted_run(
        tiny_llama_dir, data_dir, tmp_path, tiny_ctx,
        lambda number, nonzeros: ("complete", 1e-3 * nonzeros),
        trials=5, proposer=proposer,
    )
    proposed = [t for t in study.trials if t.user_attrs.get("proposed")]
    assert calls and [t.params for t in proposed] == [{"target": 0.55}]


def test_the_time_budget_stops_asking_and_leaves_nothing_running(
    tiny_llama_dir, data_dir, tmp_path, tiny_ctx
):
    summary, study, _ = scripted_run(
        tiny_llama_dir, data_dir, tmp_path, tiny_ctx,
        lambda number, nonzeros: ("complete", 1e-3 * nonzeros),
        trials=50, timeout_minutes=1e-9,
    )
    assert summary.finished < 50
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_front_size_counts_non_dominated_points():
    assert front_size([]) == 0
    assert front_size([(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0)]) == 2


@pytest.mark.parametrize("constrained", [False, True])
def test_pareto_trials_match_optunas_best_trials(constrained):
    """The screening's copy-free front is Optuna's: ties kept, failed and pruned trials out,
    infeasible ones out once constraints exist."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    points = [(10, 5.0), (20, 4.0), (20, 4.0), (15, 6.0), (30, 3.0), (5, 9.0), (12, 4.5), (40, 3.0)]
    for index, values in enumerate(points):
        trial = study.ask()
        if constrained:
            trial.set_constraint("max_ppl", values[1] - 8.0 if index != 4 else 1.0)
        study.tell(trial, values)
    study.tell(study.ask(), state=TrialState.FAIL)
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    expected = [t.number for t in study.best_trials]
    assert [t.number for t in pareto_trials(study.get_trials(deepcopy=False))] == expected
    assert (4 in expected) != constrained and {1, 2} <= set(expected)


def test_seeds_follow_the_baselines_and_breed(tiny_llama_dir, data_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, seeded=True, trials=13)
    run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study, storage=config.storage)
    seeds = [t.user_attrs.get("seed") for t in study.trials[6:12]]
    assert seeds == [f"ramp{slope}@{t:.2f}" for t in (0.3, 0.5, 0.7) for slope in ("0.2", "0.4")]
    sampled = study.trials[12]
    assert not sampled.user_attrs.keys() & {"seed", "baseline"}
    # later blocks get more sparsity than earlier ones in every seed, before projection
    for trial in study.trials[6:12]:
        assert trial.params["block_3"] > trial.params["block_1"]


def test_a_kl_trial_reads_each_window_once_and_stops_early_on_kl(tiny_llama_dir, data_dir, tmp_path):
    """With the KL objective, perplexity and KL come from the same forward pass per window, and
    multi-fidelity bounds the running KL."""
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, objective="kl", eval_windows=4, min_windows=2)
    worker = TrialWorker(config.worker_spec())
    ctx = worker.space_context(config.method, config.sparsity_range)
    plan = SearchSpace.named("uniform").cast({"target": 0.5}, ctx)
    forwards = []
    hook = worker.loaded.model.register_forward_hook(lambda *_: forwards.append(1))
    result = worker.run(TrialRequest(0, plan))
    hook.remove()
    assert result.status == "complete" and len(forwards) == result.windows == 4
    assert result.quality == result.kl > 0
    with worker.pruner.applied(plan) as model:
        assert result.kl == pytest.approx(kl_to_reference(model, worker.windows, worker.reference))
        assert result.ppl == pytest.approx(perplexity(model, worker.windows))
        assert kl_to_reference(model, worker.windows, worker.reference) > 0
    assert kl_to_reference(worker.loaded.model, worker.windows, worker.reference) == pytest.approx(0, abs=1e-3)
    stopped = worker.run(TrialRequest(1, plan, stop_above=result.kl / 10))
    assert (stopped.status, stopped.windows) == ("stopped_early", 2) and stopped.quality == stopped.kl


def test_batched_windows_give_each_window_its_own_losses(tiny_llama_dir, data_dir, tmp_path):
    """``eval_batch`` windows share a forward pass (how a GPU evaluates fast), yet every window's
    NLL and KL, the running quality and where a trial stops early are what one window per pass
    gives; a batch that runs past the stopping window costs a pass, not a different result."""
    spec = tiny_config(tiny_llama_dir, data_dir, tmp_path, objective="kl", eval_windows=5).worker_spec()
    worker = TrialWorker(spec)
    plan = SearchSpace.named("uniform").cast({"target": 0.5}, worker.space_context("wanda", (0.3, 0.7)))
    with worker.pruner.applied(plan) as model:
        single = list(window_losses(model, worker.windows, worker.reference))
        batched = list(window_losses(model, worker.windows, worker.reference, batch_size=3))
    assert len(batched) == len(single) == 5
    for one, many in zip(single, batched, strict=True):
        assert many.nll == pytest.approx(one.nll, rel=1e-5) and many.kl == pytest.approx(one.kl, rel=1e-4)
    complete = worker.run(TrialRequest(0, plan))
    stop_above = complete.kl * 1.5  # above the final KL, below the running KL of the first windows
    worker.spec = spec.model_copy(update={"eval_batch": 3})
    forwards = []
    hook = worker.loaded.model.register_forward_hook(lambda *_: forwards.append(1))
    batched_complete = worker.run(TrialRequest(1, plan))
    hook.remove()
    assert len(forwards) == 2 and batched_complete.windows == 5
    assert batched_complete.kl == pytest.approx(complete.kl, rel=1e-4)
    assert batched_complete.ppl == pytest.approx(complete.ppl, rel=1e-5)
    for request in (TrialRequest(2, plan, stop_above=stop_above), TrialRequest(3, plan, stop_above=0.0)):
        worker.spec = spec
        one_by_one = worker.run(request)
        worker.spec = spec.model_copy(update={"eval_batch": 3})
        together = worker.run(request)
        assert (together.status, together.windows) == (one_by_one.status, one_by_one.windows)
