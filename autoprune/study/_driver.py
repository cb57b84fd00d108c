"""The search loop: Optuna ask/tell over an executor, resumable from the storage alone.

One driver per study at a time: it holds the study's lease (:mod:`autoprune.study._liveness`; a
second driver on a live study refuses, naming the first), alone writes the storage, keeps
``executor.capacity`` trials in flight, and records every trial (see
:mod:`autoprune.study._records`). Starting it again with the same settings continues the study:

- trials a dead driver left RUNNING are told FAIL with ``reason="orphaned"`` once their heartbeat
  is stale, and their parameters re-enqueued, so they run again; finished trials are kept and the
  budget counts them;
- baselines (the space's uniform/OWL points at ``config.targets``) are enqueued once per study,
  before anything is sampled, so the front is never worse than them, followed by the space's
  seeds (structured prior guesses the sampler refines);
- the sampler's seed is offset by the number of trials already stored, so a resumed random start
  does not replay the first run's draws; a plan identical to one already measured is not measured
  again (told FAIL with ``reason="duplicate"``).

Multi-fidelity: every non-baseline candidate carries ``stop_above`` = ``early_stop_margin`` times
the best quality (the objective: perplexity or KL) of the feasible front members with no more
non-zeros than the candidate (for perplexity, at most ``max_ppl`` times the margin). The worker
stops after ``min_windows`` windows once its running quality is above it; such trials are told
PRUNED and never enter the front.

Constraints use Optuna 5's ``Trial.set_constraint`` before ``tell`` (values <= 0 are feasible);
samplers and ``study.best_trials`` read them from the trial's system attributes.

A proposer may suggest candidates before the sampler (see :mod:`autoprune.study._proposing`); the
caller passes it, or a factory of it, the way it passes an executor.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseGASampler
from optuna.study import StudyDirection
from optuna.trial import TrialState
from tqdm.auto import tqdm

from autoprune.api import prepare
from autoprune.data import check_source
from autoprune.errors import AutopruneError
from autoprune.gguf_presets import gguf_context
from autoprune.plan import Plan
from autoprune.study._config import SearchConfig
from autoprune.study._executor import Executor
from autoprune.study._finish import heal_front, refine_front
from autoprune.study._objectives import check_latency_table, compared_size, objective_values
from autoprune.study._liveness import DriverLease, holding, lease_for, lost_race, requeue, requeue_stale
from autoprune.study._proposing import (
    Proposer,
    ProposerFactory,
    SearchSetup,
    check_proposer,
    enqueue_proposals,
)
from autoprune.study._records import (
    BASELINES_ATTR,
    counts_toward_budget,
    front_trials,
    trial_plan,
)
from autoprune.study._settings import StudySettings
from autoprune.study._storage import load_existing_study, opened_storage, write_ahead
from autoprune.study._summary import SearchSummary, search_summary
from autoprune.study._worker import TrialRequest, TrialResult, space_context
from search_spaces import SearchSpace, SpaceContext

def directions(config: SearchConfig) -> list[StudyDirection]:
    """Every objective is minimized: the configured costs, then the quality."""
    return [StudyDirection.MINIMIZE] * (len(config.costs) + 1)

#: User attributes the driver gives the trials it enqueues (baselines, seeds, retries, proposals).
ENQUEUED_MARKS = frozenset({"baseline", "seed", "retry_of", "proposed"})
_RESULT_POLL_S = 1.0


def run_search(
    config: SearchConfig,
    executor: Executor | None = None,
    proposer: Proposer | None = None,
    progress: bool = True,
    proposer_factory: ProposerFactory | None = None,
) -> SearchSummary:
    """Run (or resume) the study ``config`` names until it holds ``config.trials`` finished trials
    or ``config.timeout_minutes`` have passed (in-flight trials are finished either way).

    Without ``executor`` the one ``config.executor`` names is built and shut down here; a given
    executor stays the caller's. ``proposer``, or the one ``proposer_factory`` builds once the
    space's context is known, suggests candidates; ``predictor: on`` needs one of them.
    """
    start = time.perf_counter()
    check_proposer(config, proposer, proposer_factory)
    check_source(config.data)
    with opened_storage(config.storage, create=True) as storage:
        space = SearchSpace.named(config.space)
        resumed = _check_existing(storage, config)
        lease = lease_for(storage, config.study)  # a live driver refuses this one before it prepares
        owned = executor is None
        executor = executor or config.make_executor(progress)
        try:
            ctx = _space_context(config, executor, progress)
            distributions = space.distributions(ctx)
            if proposer_factory is not None:
                setup = SearchSetup(config, space, ctx, distributions, executor, progress)
                proposer = proposer_factory(setup)
            write_ahead(storage)  # checks done: from here on the study is written
            with holding(lease):
                study = optuna.create_study(
                    storage=storage, study_name=config.study, directions=directions(config),
                    load_if_exists=True,
                )
                if not resumed:
                    config.settings().write(study)
                study.sampler = config.make_sampler(seed_offset=len(study.get_trials(deepcopy=False)))
                orphans = requeue_stale(study, storage, lease.grace)
                if not study.user_attrs.get(BASELINES_ATTR):
                    targets = ctx.on_target_grid(config.targets)
                    for label, params in space.baselines(ctx, targets).items():
                        study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)
                    for label, params in space.seeds(ctx, targets).items() if config.seeded else ():
                        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
                    study.set_user_attr(BASELINES_ATTR, True)
                _Loop(study, space, ctx, distributions, config, executor, proposer, lease).run(progress)
                if lease.lost:
                    raise AutopruneError(f"study {config.study!r} was taken over by another driver")
        finally:
            if owned:
                executor.shutdown()
    refined, missed = refine_front(config, progress)  # the trials' worker is gone: one model in memory
    healed, missed_heal = heal_front(config, progress)
    return search_summary(
        load_existing_study(config.storage, config.study), config, orphans, resumed,
        time.perf_counter() - start, [r.line() for r in refined], missed,
        [h.line() for h in healed], missed_heal,
    )


def _check_existing(storage: optuna.storages.BaseStorage, config: SearchConfig) -> bool:
    """Whether the study exists (a resume); refuse one whose numbers would not be comparable."""
    try:
        existing = optuna.load_study(study_name=config.study, storage=storage)
    except KeyError:
        return False
    stored = StudySettings.stored_in(existing)
    if len(existing.directions) not in (2, 3) or (stored is None and existing.trials):
        raise AutopruneError(f"study {config.study!r} exists but was not created by autoprune search")
    if stored is None:  # created by a run killed before it wrote its settings: adopt it
        return False
    was = stored.model_dump(mode="json")
    for key, value in config.settings().model_dump(mode="json").items():
        if was[key] != value:
            raise AutopruneError(
                f"study {config.study!r} was created with {key}={was[key]!r}, this run has "
                f"{value!r}; keep the settings or name another --study"
            )
    return True


def _space_context(config: SearchConfig, executor: Executor, progress: bool) -> SpaceContext:
    """From one of the executor's workers when it can tell, else from the model loaded here once."""
    ctx = executor.space_context(config.method, config.sparsity_range)
    if ctx is not None:
        return ctx
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    prepared = prepare(config.model, config.calibration(), cache_dir, progress)
    gguf = gguf_context(prepared.loaded, cache_dir=cache_dir) if config.worker_spec().gguf else None
    return space_context(prepared.loaded, prepared.stats, config.method, config.sparsity_range,
                         config.database_settings(), gguf)


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(plan.to_json().encode()).hexdigest()


@dataclass
class _Pending:
    trial: optuna.Trial
    digest: str
    driver_seconds: float


class _Loop:
    """Keeps the executor busy, records results, and tracks the front in memory for thresholds."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        ctx: SpaceContext,
        distributions: dict[str, BaseDistribution],
        config: SearchConfig,
        executor: Executor,
        proposer: Proposer | None,
        lease: DriverLease | None = None,
    ) -> None:
        self.study, self.space, self.ctx, self.distributions = study, space, ctx, distributions
        self.config, self.executor, self.proposer, self.lease = config, executor, proposer, lease
        self.in_flight: dict[int, _Pending] = {}
        self.digests: set[str] = set()
        self.finished = 0
        for frozen in study.get_trials(deepcopy=False):
            self.finished += counts_toward_budget(frozen)
            if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED) and "plan" in frozen.user_attrs:
                self.digests.add(plan_digest(trial_plan(frozen)))
        self.size_key = compared_size(config.costs)
        self.points = [_point(t.user_attrs["size"], t.values[-1], self.size_key) for t in front_trials(study)]
        self.node = f"{platform.node()}:{os.getpid()}"
        minutes = config.timeout_minutes
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def run(self, progress: bool) -> None:
        bar = tqdm(
            total=self.config.trials,
            initial=min(self.finished, self.config.trials),
            desc=f"search {self.config.study}",
            unit="trial",
            disable=not progress,
            postfix={"front": front_size(self.points)},
        )
        if self.lease is not None:
            self.lease.track(lambda: [p.trial.number for p in list(self.in_flight.values())])
        try:
            while self._wanted() > 0 or self.in_flight:
                while len(self.in_flight) < self.executor.capacity and self._wanted() > 0:
                    if not self._submit_next():
                        self._advance(bar)
                for result in self.executor.results(timeout=_RESULT_POLL_S):
                    self._finish(result)
                    self._advance(bar)
        except KeyboardInterrupt:
            self._requeue_in_flight()
            raise
        finally:
            bar.close()

    def _wanted(self) -> int:
        """Trials still to ask for: none once the time budget is spent."""
        if self.deadline is not None and time.monotonic() > self.deadline or self.lease and self.lease.lost:
            return 0
        return self.config.trials - self.finished - len(self.in_flight)

    def _advance(self, bar: tqdm) -> None:
        self.finished += 1
        bar.update(1)
        bar.set_postfix(front=front_size(self.points))

    def _submit_next(self) -> bool:
        """Ask, cast and submit one trial; False when it was a duplicate (told, not submitted)."""
        start = time.perf_counter()
        if self.proposer is not None:
            enqueue_proposals(self.study, self.proposer, self.executor.capacity - len(self.in_flight))
        trial = self.study.ask(self.distributions)
        marks = trial.user_attrs.keys() & ENQUEUED_MARKS
        if marks:
            self._join_population(trial)
        plan = self.space.cast(trial.params, self.ctx)
        digest = plan_digest(plan)
        expected = self.ctx.nonzeros(plan)
        stop_above = None if "baseline" in marks else self._stop_above(self._expected_size(plan, expected))
        for key, value in {
            "plan": plan.model_dump(mode="json"),
            "plan_summary": plan.summary(),
            "expected_nonzeros": expected,
            "stop_above": stop_above,
            "driver": self.node,
        }.items():
            trial.set_user_attr(key, value)
        if digest in self.digests or any(p.digest == digest for p in self.in_flight.values()):
            with lost_race(trial.number):
                trial.set_user_attr("status", "duplicate")
                trial.set_user_attr("reason", "duplicate")
                self.study.tell(trial, state=TrialState.FAIL)
            return False
        self.executor.submit(TrialRequest(trial.number, plan, stop_above))
        self.in_flight[trial.number] = _Pending(trial, digest, time.perf_counter() - start)
        return True

    def _join_population(self, trial: optuna.Trial) -> None:
        """Put an enqueued trial into the genetic sampler's current generation. Optuna leaves
        fixed-parameter trials out of NSGA populations, so baselines would never be parents."""
        sampler = self.study.sampler
        if isinstance(sampler, BaseGASampler):
            sampler.get_trial_generation(self.study, self.study.get_trials(deepcopy=False)[trial.number])

    def _expected_size(self, plan: Plan, nonzeros: int) -> int:
        """The candidate's size as early stopping compares it (:func:`compared_size`)."""
        return self.ctx.gguf.plan_bytes(plan) if self.size_key == "gguf_bytes" and self.ctx.gguf else nonzeros

    def _stop_above(self, size: int) -> float | None:
        """The quality (perplexity or KL, the objective) above which this candidate cannot reach
        the front, times the margin."""
        margin = self.config.early_stop_margin
        if margin is None:
            return None
        limits = [q for n, q in self.points if n <= size]
        bounds = [min(limits)] if limits else []
        if self.config.max_ppl is not None and self.config.objective == "ppl":
            bounds.append(self.config.max_ppl)
        return margin * min(bounds) if bounds else None

    def _finish(self, result: TrialResult) -> None:
        pending = self.in_flight.pop(result.number)
        start = time.perf_counter()
        trial = pending.trial
        attrs = result.record()
        state, values = TrialState.FAIL, None
        if result.status in ("complete", "stopped_early"):
            self._check_latency_table(trial, result)
        if result.status == "complete":
            state = TrialState.COMPLETE
            values = objective_values(self.config.costs, result.size, result.quality)
        elif result.status == "stopped_early":
            state = TrialState.PRUNED
        else:
            attrs["reason"] = result.error or result.status
        with lost_race(result.number) as race:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            feasible = state == TrialState.COMPLETE and self._constrain(trial, result)
            seconds = dict(result.seconds)
            driver = pending.driver_seconds + time.perf_counter() - start
            seconds["bookkeeping"] = round(seconds.get("bookkeeping", 0.0) + driver, 4)
            seconds["total"] = round(seconds.get("total", 0.0) + driver, 4)
            trial.set_user_attr("seconds", seconds)
            self.study.tell(trial, values, state=state)
        if race.lost:
            return
        if state != TrialState.FAIL:
            self.digests.add(pending.digest)
        if feasible:
            self.points.append(_point(result.size, values[-1], self.size_key))

    def _check_latency_table(self, trial: optuna.Trial, result: TrialResult) -> None:
        """Stop the search, this trial told FAIL, where its latency was priced by another table."""
        try:
            check_latency_table(self.study, result.size)
        except AutopruneError as error:
            with lost_race(result.number):
                trial.set_user_attr("reason", "latency table")
                self.study.tell(trial, state=TrialState.FAIL)
            raise error from None

    def _constrain(self, trial: optuna.Trial, result: TrialResult) -> bool:
        """Set the configured constraints (<= 0 is feasible); whether all hold."""
        constraints = {}
        if self.config.max_ppl is not None:
            constraints["max_ppl"] = result.ppl - self.config.max_ppl
        if self.config.max_nonzeros is not None:
            constraints["max_nonzeros"] = float(result.size["linear_nonzeros"] - self.config.max_nonzeros)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        return all(value <= 0 for value in constraints.values())

    def _requeue_in_flight(self) -> None:
        """On Ctrl-C, in-flight trials become orphans now rather than on the next start."""
        for number, pending in self.in_flight.items():
            with lost_race(number):
                requeue(self.study, pending.trial, pending.trial.params)
        self.in_flight.clear()


def _point(size: dict[str, Any], quality: float, key: str) -> tuple[int, float]:
    """A front member as early stopping compares candidates: (its size under ``key``: decoder
    linear non-zeros, or its GGUF file's bytes; quality)."""
    return int(size[key]), float(quality)


def front_size(points: list[tuple[int, float]]) -> int:
    """How many of ``(nonzeros, quality)`` points no other point dominates."""
    best, size = float("inf"), 0
    for _, quality in sorted(points):
        if quality < best:
            best, size = quality, size + 1
    return size
