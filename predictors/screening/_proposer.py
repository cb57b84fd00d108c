"""Screening inside the search: the driver's proposer hook backed by the accuracy predictor.

After a warm-up of real trials (the enqueued baselines and seeds, then one population of the
sampler's own, so the first fit sees structured and random plans), every time the driver has free
slots it asks this proposer, which

1. refits the predictor on every complete trial so far (so it learns as trials finish);
2. draws at least ``SCREEN_FACTOR`` (20) times as many candidates as it will pick, a quarter
   uniformly from the space's distributions and the rest offspring of the measured front (see
   :class:`CandidateSampler`): the trees interpolate near measured plans far better than they
   extrapolate to random ones. Half the parents are drawn uniformly from the front, half in
   proportion to the hypervolume each alone contributes (as NSGA-II's crowding distance favours
   isolated points): the front's wide gaps, typically at its sparse end, get refined first;
3. predicts them all with ``ensemble`` predictors fitted with different seeds (row and column
   subsampling make them disagree where the data say little) and scores each candidate by the
   ensemble's mean plus ``pessimism`` times its spread: the candidates that look best to one
   model are mostly the ones it overrates the most (early predictions run 2-5x optimistic), and
   the spread marks them; then picks, one at a time, the candidate whose predicted point adds the most
   hypervolume to the measured front and the picks so far, in (kept fraction, log-quality): the
   candidates on the predicted front, best first; when none is predicted to add anything, the one
   the fewest candidates are predicted to dominate (nearest the predicted front);
4. replaces each pick, with probability ``explore``, by a random candidate, so the predictor also
   sees plans it would not choose and can correct itself.

Each pick carries its (pessimistic) prediction (``predicted_<quality>``), how many candidates were screened and
why it was picked as user attributes; the front is built from measured values only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.api import prepare
from autoprune.plan import Plan
from autoprune.study import InProcessExecutor, SearchSetup, pareto_trials, trial_plan
from predictors.features import Featurizer, space_has_widths
from predictors.model import KEPT_FEATURE, Predictor, TrainingSet, training_set
from predictors.quality import domination_counts
from predictors.screening._candidates import CandidateSampler
from search_spaces import Params, SearchSpace, SpaceContext

#: Candidates screened per pick, at least (the issue's bar).
SCREEN_FACTOR = 20
#: Candidates screened per round, at least: one pick per round is common (one free slot).
MIN_CANDIDATES = 400
EXPLORE_SHARE = 0.1
#: Predictors fitted per round, and how many of their standard deviations a candidate's score adds
#: to their mean (0: the plain mean, as one model would give).
ENSEMBLE = 5
PESSIMISM = 1.0
#: Share of the candidates that are offspring of the front; the parameters an offspring mutates
#: (probability each) and by how much (share of each range, one standard deviation).
LOCAL_SHARE = 0.75
MUTATION_RATE = 0.25
MUTATION_SCALE = 0.1
#: User attributes of the trials the driver enqueues before sampling (baselines, seeds).
WARMUP_MARKS = frozenset({"baseline", "seed"})
#: Log-quality margin above the worst point for the reference point of the hypervolume gain.
_REFERENCE_MARGIN = 0.1
#: Kept-fraction margin beyond the densest front point for parents' contributions.
_KEPT_MARGIN = 0.02
#: Rounds of drawing again for candidates that turned out duplicates, at most.
_DRAWS = 50


class PredictorProposer:
    """A ``proposer(study, n)`` for :func:`autoprune.study.run_search` (see the module doc);
    :meth:`for_search` is the proposer factory of a search with ``predictor: on``."""

    def __init__(
        self,
        space: SearchSpace,
        ctx: SpaceContext,
        featurizer: Featurizer,
        distributions: dict[str, BaseDistribution],
        population: int,
        seed: int = 0,
        min_candidates: int = MIN_CANDIDATES,
        explore: float = EXPLORE_SHARE,
        ensemble: int = ENSEMBLE,
        pessimism: float = PESSIMISM,
    ) -> None:
        self.space, self.ctx, self.featurizer = space, ctx, featurizer
        self.distributions, self.population, self.seed = distributions, population, seed
        self.min_candidates, self.explore = min_candidates, explore
        self.ensemble, self.pessimism = ensemble, pessimism
        #: One entry per screening round: trials trained on, candidates screened, picks.
        self.rounds: list[dict[str, int]] = []

    @classmethod
    def for_search(cls, setup: SearchSetup) -> PredictorProposer:
        """The proposer of a search with ``predictor: on``:
        ``run_search(config, proposer_factory=PredictorProposer.for_search)``. Its importance
        features need the model's dense weights: an in-process worker's when the search has one,
        else the model is loaded once more here (statistics come from the cache)."""
        config = setup.config
        if isinstance(setup.executor, InProcessExecutor):
            loaded, stats = setup.executor.worker.loaded, setup.executor.worker.stats
        else:
            cache_dir = Path(config.cache_dir) if config.cache_dir else None
            loaded, stats, _ = prepare(config.model, config.calibration(), cache_dir, setup.progress)
        featurizer = Featurizer.from_model(loaded, stats, setup.ctx, space_has_widths(setup.space, setup.ctx))
        return cls(
            setup.space, setup.ctx, featurizer, setup.distributions, config.population, config.seed
        )

    def __call__(self, study: optuna.Study, n: int) -> list[tuple[Params, dict[str, Any]]]:
        trials = study.get_trials(deepcopy=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) < self.warmup(trials):
            return []  # the sampler explores first
        rng = np.random.default_rng([self.seed, len(trials)])  # a resumed run draws anew
        data = training_set(study, self.featurizer, stopped_early=True)
        measured = {trial_plan(t).to_json() for t in trials if "plan" in t.user_attrs}
        best = [t for t in pareto_trials(trials) if t.values[-1] > 0]  # a zero KL has no logarithm
        front = np.array([
            (t.user_attrs["size"]["linear_nonzeros"] / self.ctx.dense_linear_params, np.log(t.values[-1]))
            for t in best
        ]).reshape(-1, 2)
        worst = float(data.log_quality[data.complete].max()) + _REFERENCE_MARGIN
        count = max(SCREEN_FACTOR * n, self.min_candidates)
        params, plans = self._candidates(best, front, worst, rng, count, measured)
        if not plans:
            return []  # a small space measured through: nothing left to screen
        features = self.featurizer.transform(plans)
        predicted = self._scores(data, features)
        kept = features[:, self.featurizer.names.index(KEPT_FEATURE)]  # a sub-network's kept weights too
        picks = self._pick(np.column_stack([kept, predicted]), front, worst, n, rng)
        self.rounds.append({"trained_on": len(data), "screened": len(plans), "picked": len(picks)})
        quality = f"predicted_{data.quality_name}"
        return [
            (params[i], {quality: float(np.exp(predicted[i])), "screened": len(plans), "screen_pick": why})
            for i, why in picks
        ]

    def _scores(self, data: TrainingSet, features: np.ndarray) -> np.ndarray:
        """Pessimistic predicted log-quality of candidates (their feature rows): the ensemble's
        mean plus :attr:`pessimism` standard deviations."""

        def member_scores(member: int) -> np.ndarray:
            return Predictor.fit(data, self.featurizer.schema, "regression", self.seed + member).scores(features)

        # Each fit is single-threaded (so deterministic) and xgboost releases the GIL; while the
        # driver screens, an in-process worker waits, so the members train side by side.
        with ThreadPoolExecutor(max_workers=min(self.ensemble, os.cpu_count() or 1)) as pool:
            predictions = np.array(list(pool.map(member_scores, range(self.ensemble))))
        return predictions.mean(axis=0) + self.pessimism * predictions.std(axis=0)

    def warmup(self, trials: list[FrozenTrial]) -> int:
        """Complete trials wanted before screening: every enqueued baseline and seed, then one
        population."""
        return sum(bool(t.user_attrs.keys() & WARMUP_MARKS) for t in trials) + self.population

    def _candidates(
        self, best: list[FrozenTrial], front: np.ndarray, worst: float, rng: np.random.Generator,
        count: int, measured: set[str],
    ) -> tuple[list[Params], list[Plan]]:
        """``count`` distinct candidates whose plans were never measured, with their plans;
        :data:`LOCAL_SHARE` of them offspring of the measured front ``best`` (at ``front``).
        Duplicates (many parameters cast to one plan on small layers) are drawn again until a
        round finds nothing new: a small space may have fewer plans left."""
        sampler = CandidateSampler(self.distributions, rng)
        chosen = [i for i, t in enumerate(best) if t.params.keys() == self.distributions.keys()]
        parents = [best[i].params for i in chosen]
        weights = parent_weights(front[chosen], worst) if chosen else None
        params: list[Params] = []
        plans: list[Plan] = []
        seen = set(measured)
        for _ in range(_DRAWS):
            missing, before = count - len(plans), len(plans)
            local = round(LOCAL_SHARE * missing) if parents else 0
            drawn = sampler.uniform(missing - local)
            drawn += sampler.offspring(parents, local, MUTATION_SCALE, MUTATION_RATE, weights)
            for candidate in drawn:
                plan = self.space.cast(candidate, self.ctx)
                key = plan.to_json()
                if key not in seen:
                    seen.add(key)
                    params.append(candidate)
                    plans.append(plan)
            if len(plans) in (count, before):
                break
        return params, plans

    def _pick(
        self, points: np.ndarray, front: np.ndarray, worst: float, n: int, rng: np.random.Generator
    ) -> list[tuple[int, str]]:
        """Indices of ``n`` candidates (rows of ``points``) and why each was picked; ``worst`` is
        the log-quality of the reference point (above every measured trial)."""
        reference = np.array([1.0, max(points[:, 1].max() + _REFERENCE_MARGIN, worst)])
        nearness = domination_counts(points[:, 0], points[:, 1])
        chosen: list[tuple[int, str]] = []
        base = front
        for _ in range(min(n, len(points))):
            free = np.setdiff1d(np.arange(len(points)), [i for i, _ in chosen])
            if rng.random() < self.explore:
                chosen.append((int(rng.choice(free)), "explore"))
                continue
            floor = moocore.hypervolume(base, ref=reference) if len(base) else 0.0
            gains = np.array(
                [moocore.hypervolume(np.vstack([base, points[i]]), ref=reference) - floor for i in free]
            )
            best = int(free[np.argmax(gains)]) if gains.max() > 0 else int(free[np.argmin(nearness[free])])
            chosen.append((best, "front" if gains.max() > 0 else "near-front"))
            base = np.vstack([base, points[best]])
        return chosen


def parent_weights(points: np.ndarray, worst: float) -> np.ndarray:
    """Probabilities of front ``points`` (kept fraction, log-quality) as parents: half uniform,
    half in proportion to each point's exclusive hypervolume. The reference is the worst measured
    log-quality (so the sparse end's box spans everything it beats) and a kept fraction just
    beyond the front's densest point (whose box would otherwise reach the dense model)."""
    uniform = np.full(len(points), 1.0 / len(points))
    reference = np.array([points[:, 0].max() + _KEPT_MARGIN, worst])
    contributions = moocore.hv_contributions(points, ref=reference)
    total = contributions.sum()
    return 0.5 * uniform + 0.5 * (contributions / total if total > 0 else uniform)
