"""The accuracy predictor: gradient-boosted trees (xgboost) from plan features to quality.

Two objectives: ``regression`` fits log-quality (log-perplexity or log-KL) with squared error, so
its output is a quality estimate; ``ranking`` (``rank:pairwise``) only learns the order, which is
all screening needs, and is kept for comparison in the quality report. Either way a higher score
means a worse plan.

Size explains most of a plan's quality, and trees spend their few splits on it when they have to
learn it: the allocation (which of two equally large plans is better, the question screening
asks) gets what is left. So a :class:`Baseline` is fitted first and given to xgboost as the base
margin: log-quality as a ridge regression on the model-wide features (the kept fraction, its
square and cube, the importance removed, removed blocks, a sub-network's widths), a handful of
columns that tens of trials can fit, where trees on hundreds of per-layer columns cannot; the
trees learn what per-layer detail adds to it. The quality report (``autoprune predictor report``)
measures the result on any study; experiments/README.md compares it with a size curve alone.

Saved with xgboost's own ``save_model`` (JSON) and a metadata JSON beside it holding the feature
schema and the baseline: loading checks nothing about the machine, predicting checks the schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import xgboost as xgb
from pydantic import BaseModel, ConfigDict, ValidationError

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from predictors.features import Featurizer, FeatureSchema
from predictors.model._data import TrainingSet

#: 2: the base margin is a :class:`Baseline` (format 1: a cubic of the kept fraction alone).
PREDICTOR_FORMAT = 2
Objective = Literal["regression", "ranking"]
OBJECTIVES: dict[str, dict[str, object]] = {
    "regression": {"objective": "reg:squarederror"},
    "ranking": {
        "objective": "rank:pairwise",
        "lambdarank_pair_method": "mean",  # pairs over the whole list, not just its top
        "lambdarank_num_pair_per_sample": 8,
    },
}
#: Shallow trees, slow learning, column subsampling: studies hold tens to hundreds of trials and
#: hundreds of (correlated) features. One thread: results do not depend on the machine's cores.
BOOSTER_PARAMS: dict[str, object] = {
    "max_depth": 3,
    "eta": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.5,
    "min_child_weight": 1.0,
    "nthread": 1,
}
BOOSTING_ROUNDS = 300
#: The feature the baseline raises to powers (see :mod:`predictors.features`).
KEPT_FEATURE = "model.kept_fraction"
#: The baseline reads every feature named so: one value per plan, not per layer or block.
MODEL_PREFIX = "model."
#: Ridge penalty of the baseline on standardized columns: a dozen columns from tens of trials.
BASELINE_RIDGE = 10.0


class Baseline(BaseModel):
    """Log-quality as a ridge regression on the model-wide features and the kept fraction's square
    and cube, each column held to the range it was fitted on (a cubic runs off either side)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: list[str]
    low: list[float]
    high: list[float]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float

    @classmethod
    def fit(cls, features: np.ndarray, names: Sequence[str], log_quality: np.ndarray) -> Baseline:
        columns = [name for name in names if name.startswith(MODEL_PREFIX)]
        raw = _baseline_columns(features, names, columns)
        mean, scale = raw.mean(0), raw.std(0)
        scale[scale == 0] = 1.0
        z = (raw - mean) / scale
        intercept = float(log_quality.mean())
        weights = np.linalg.solve(z.T @ z + BASELINE_RIDGE * np.eye(z.shape[1]), z.T @ (log_quality - intercept))
        return cls(
            columns=columns, low=raw.min(0).tolist(), high=raw.max(0).tolist(), mean=mean.tolist(),
            scale=scale.tolist(), weights=weights.tolist(), intercept=intercept,
        )

    def __call__(self, features: np.ndarray, names: Sequence[str]) -> np.ndarray:
        raw = np.clip(_baseline_columns(features, names, self.columns), self.low, self.high)
        return (raw - np.array(self.mean)) / np.array(self.scale) @ np.array(self.weights) + self.intercept


def _baseline_columns(features: np.ndarray, names: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    kept = features[:, list(names).index(KEPT_FEATURE)]
    picked = features[:, [list(names).index(name) for name in columns]]
    return np.column_stack([picked, kept**2, kept**3])


class PredictorMeta(BaseModel):
    """What the booster file does not say: what its inputs and outputs mean."""

    model_config = ConfigDict(extra="forbid")

    format: int = PREDICTOR_FORMAT
    features: FeatureSchema
    baseline: Baseline
    objective: Objective
    quality: str
    methods: list[str]
    study: str
    trials: int
    seed: int


class Predictor:
    """A trained booster and its metadata."""

    def __init__(self, booster: xgb.Booster, meta: PredictorMeta) -> None:
        self.booster, self.meta = booster, meta

    @classmethod
    def fit(
        cls, data: TrainingSet, schema: FeatureSchema, objective: Objective = "regression", seed: int = 0
    ) -> Predictor:
        """Train on ``data`` (featurized under ``schema``): the baseline, then the trees."""
        baseline = Baseline.fit(data.features, schema.names, data.log_quality)
        matrix = _matrix(data.features, schema, baseline, data.log_quality, objective == "ranking")
        params = {**BOOSTER_PARAMS, **OBJECTIVES[objective], "seed": seed}
        booster = xgb.train(params, matrix, num_boost_round=BOOSTING_ROUNDS)
        meta = PredictorMeta(
            features=schema,
            baseline=baseline,
            objective=objective,
            quality=data.quality_name,
            methods=sorted({plan.method for plan in data.plans}),
            study=data.study,
            trials=len(data),
            seed=seed,
        )
        return cls(booster, meta)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Raw outputs for feature rows (log-quality for regression): higher is worse."""
        matrix = _matrix(features, self.meta.features, self.meta.baseline)
        return self.booster.predict(matrix).astype(float)

    def predict(self, plans: Sequence[Plan], featurizer: Featurizer) -> np.ndarray:
        """Scores of ``plans``; refused for a featurizer of another model or calibration, and for
        plans of a method the predictor never saw."""
        self.meta.features.require_same(featurizer.schema)
        unseen = sorted({plan.method for plan in plans} - set(self.meta.methods))
        if unseen:
            raise AutopruneError(
                f"the predictor was trained on {', '.join(self.meta.methods)} plans, not {unseen[0]}"
            )
        return self.scores(featurizer.transform(plans))

    def predict_quality(self, plans: Sequence[Plan], featurizer: Featurizer) -> np.ndarray:
        """Predicted quality (perplexity or KL) of ``plans``: regression predictors only."""
        if self.meta.objective != "regression":
            raise AutopruneError("a ranking predictor orders plans; it does not predict their quality")
        return np.exp(self.predict(plans, featurizer))

    def save(self, path: Path) -> Path:
        """Write the booster to ``path`` (``.json``) and the metadata beside it; return the latter."""
        check_predictor_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path))
        meta_path = meta_path_of(path)
        meta_path.write_text(self.meta.model_dump_json(indent=2))
        return meta_path

    @classmethod
    def load(cls, path: Path) -> Predictor:
        meta_path = meta_path_of(path)
        for needed in (path, meta_path):
            if not needed.is_file():
                raise AutopruneError(f"no predictor at {path}: {needed} does not exist (run fit first)")
        try:
            meta = PredictorMeta.model_validate(json.loads(meta_path.read_text()))
        except (ValueError, ValidationError) as error:
            reason = " ".join(str(error).split())[:200]
            raise AutopruneError(f"predictor metadata {meta_path} is invalid: {reason}") from None
        if meta.format != PREDICTOR_FORMAT:
            raise AutopruneError(f"predictor {path} has format {meta.format}, this reads {PREDICTOR_FORMAT}")
        booster = xgb.Booster()
        try:
            booster.load_model(str(path))
        except xgb.core.XGBoostError as error:
            reason = str(error).strip().splitlines()[0][:200]
            raise AutopruneError(f"predictor {path} is not an xgboost model: {reason}") from None
        if booster.num_features() != len(meta.features.names):
            raise AutopruneError(
                f"predictor {path} reads {booster.num_features()} features, its metadata "
                f"{meta_path} describes {len(meta.features.names)}: the files do not belong together"
            )
        return cls(booster, meta)


def _matrix(
    features: np.ndarray,
    schema: FeatureSchema,
    baseline: Baseline,
    log_quality: np.ndarray | None = None,
    ranking: bool = False,
) -> xgb.DMatrix:
    """Feature rows with the baseline as base margin (and labels, and one query for ranking)."""
    return xgb.DMatrix(
        features,
        label=log_quality,
        base_margin=baseline(features, schema.names),
        qid=np.zeros(len(features), dtype=int) if ranking else None,
    )


def check_predictor_path(path: Path) -> None:
    """xgboost picks the format by suffix; the metadata's name is derived from it."""
    if path.suffix != ".json":
        raise AutopruneError(f"a predictor is saved as .json, got {path.name}")


def meta_path_of(path: Path) -> Path:
    """``x.predictor.json`` -> ``x.predictor.meta.json``."""
    return path.with_suffix(".meta.json")
