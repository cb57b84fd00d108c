"""Training data: a study's measured trials as features and measured quality, and the featurizer
of the model a study searched."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.api import prepare
from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.study import study_settings, trial_plan
from predictors.features import Featurizer, space_has_widths
from search_spaces import SearchSpace, SpaceContext


@dataclass(frozen=True)
class TrainingSet:
    """Measured trials of one study. ``complete`` marks those measured on every window; the others
    (only with ``stopped_early``) carry the estimate of the windows they reached."""

    study: str
    quality_name: str
    trials: np.ndarray
    plans: list[Plan]
    nonzeros: np.ndarray
    quality: np.ndarray
    features: np.ndarray
    complete: np.ndarray

    def __len__(self) -> int:
        return len(self.trials)

    @property
    def log_quality(self) -> np.ndarray:
        """The regression target: quality spans orders of magnitude across sparsities."""
        return np.log(self.quality)

    def subset(self, index: np.ndarray) -> TrainingSet:
        return TrainingSet(
            self.study,
            self.quality_name,
            self.trials[index],
            [self.plans[i] for i in index],
            self.nonzeros[index],
            self.quality[index],
            self.features[index],
            self.complete[index],
        )


def training_set(
    study: optuna.Study, featurizer: Featurizer, minimum: int = 2, stopped_early: bool = False
) -> TrainingSet:
    """The study's complete trials of its own pruning method with a positive, finite quality,
    featurized; at least ``minimum`` of them or an :class:`AutopruneError`.

    ``stopped_early`` adds the trials stopped early, labelled with the quality of the windows they
    reached. A noisy label, so quality reports leave them out; but a screen that learns only from
    trials good enough to finish sees no bad plans and rates unexplored regions as good as the
    front, so its picks are then mostly stopped early.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED) if stopped_early else (TrialState.COMPLETE,)
    # A trial pruned with another method than the study's (``refine --method``) measures that
    # method: the features describe its allocation only, so its label would mislead the model.
    settings = study_settings(study)
    labelled = [
        (t, label)
        for t in study.get_trials(deepcopy=False, states=states)
        if t.user_attrs.get("plan", {}).get("method") == settings.method
        and (label := _label(t)) is not None
    ]
    complete = sum(t.state == TrialState.COMPLETE for t, _ in labelled)
    if complete < minimum:
        raise AutopruneError(
            f"study {study.study_name!r} has {complete} complete trial(s); a predictor needs "
            f"at least {minimum}"
        )
    plans = [trial_plan(t) for t, _ in labelled]
    return TrainingSet(
        study=study.study_name,
        quality_name=settings.objective,
        trials=np.array([t.number for t, _ in labelled]),
        plans=plans,
        nonzeros=np.array([nonzeros for _, (nonzeros, _) in labelled], dtype=float),
        quality=np.array([quality for _, (_, quality) in labelled], dtype=float),
        features=featurizer.transform(plans),
        complete=np.array([t.state == TrialState.COMPLETE for t, _ in labelled]),
    )


def _label(trial: FrozenTrial) -> tuple[float, float] | None:
    """(non-zeros, quality) of a measured trial, or None where the quality is not a positive
    number (a zero KL has no logarithm)."""
    nonzeros = trial.user_attrs["size"]["linear_nonzeros"]
    quality = trial.values[-1] if trial.state == TrialState.COMPLETE else trial.user_attrs["quality"]
    if quality is None or not math.isfinite(quality) or quality <= 0:
        return None
    return float(nonzeros), float(quality)


def study_featurizer(study: optuna.Study, cache_dir: Path | None = None, progress: bool = False) -> Featurizer:
    """The featurizer of the model and calibration ``study`` searched (statistics from the cache),
    with the width features where the study's space makes sub-network plans or a trial holds one."""
    settings = study_settings(study)
    prepared = prepare(settings.model, settings.calibration, cache_dir, progress)
    ctx = SpaceContext.from_model(
        prepared.loaded, prepared.stats, settings.method, settings.sparsity_range, outlier_thresholds=()
    )
    widths = space_has_widths(SearchSpace.named(settings.space), ctx) or any(
        t.user_attrs.get("plan", {}).get("structure") is not None for t in study.get_trials(deepcopy=False)
    )
    return Featurizer.from_model(prepared.loaded, prepared.stats, ctx, widths)
