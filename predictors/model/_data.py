"""Training data: a study's finished, fully measured trials as features and measured quality, and
the featurizer of the model a study searched."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from autoprune.api import prepare
from autoprune.config import CalibrationConfig
from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.study import study_settings, trial_plan
from predictors.features import Featurizer
from search_spaces import SpaceContext


@dataclass(frozen=True)
class TrainingSet:
    """COMPLETE trials of one study: stopped-early trials only have a partial estimate, failed ones
    none, so neither is a label."""

    study: str
    quality_name: str
    trials: np.ndarray
    plans: list[Plan]
    nonzeros: np.ndarray
    quality: np.ndarray
    features: np.ndarray

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
        )


def training_set(study: optuna.Study, featurizer: Featurizer, minimum: int = 2) -> TrainingSet:
    """The study's complete trials with a positive, finite quality, featurized; at least
    ``minimum`` of them or an :class:`AutopruneError`."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "plan" in t.user_attrs and math.isfinite(t.values[1]) and t.values[1] > 0
    ]
    if len(trials) < minimum:
        raise AutopruneError(
            f"study {study.study_name!r} has {len(trials)} complete trial(s); a predictor needs "
            f"at least {minimum}"
        )
    plans = [trial_plan(t) for t in trials]
    return TrainingSet(
        study=study.study_name,
        quality_name=str(study_settings(study)["objective"]),
        trials=np.array([t.number for t in trials]),
        plans=plans,
        nonzeros=np.array([t.values[0] for t in trials], dtype=float),
        quality=np.array([t.values[1] for t in trials], dtype=float),
        features=featurizer.transform(plans),
    )


def study_featurizer(study: optuna.Study, cache_dir: Path | None = None, progress: bool = False) -> Featurizer:
    """The featurizer of the model and calibration ``study`` searched (statistics from the cache)."""
    settings = study_settings(study)
    calibration = CalibrationConfig(**settings["calibration"])
    loaded, stats, _ = prepare(settings["model"], calibration, cache_dir, progress)
    ctx = SpaceContext.from_model(
        loaded, stats, settings["method"], tuple(settings["sparsity_range"]), outlier_thresholds=()
    )
    return Featurizer.from_model(loaded, stats, ctx)
