"""The quality report: a held-out split and k-fold cross-validation, for both objectives.

Every number comes from predictors fitted without the trials they are scored on. The held-out
split is the headline (its regression Spearman is the report's ``spearman``); k-fold says how much
that number depends on which trials were held out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoprune.errors import AutopruneError
from predictors.features import FeatureSchema
from predictors.model import OBJECTIVES, Predictor, TrainingSet
from predictors.quality._metrics import METRICS, prediction_metrics

HOLDOUT_SHARE = 0.3
FOLDS = 5
MIN_TRIALS = 10


def quality_report(
    data: TrainingSet, schema: FeatureSchema, seed: int = 0, holdout: float = HOLDOUT_SHARE,
    folds: int = FOLDS,
) -> dict[str, Any]:
    """Metrics of both objectives on a ``holdout`` share of the trials (fitted on the rest) and by
    ``folds``-fold cross-validation (mean and standard deviation over folds)."""
    if len(data) < max(MIN_TRIALS, 2 * folds):
        raise AutopruneError(
            f"study {data.study!r} has {len(data)} complete trials; a quality report needs at least "
            f"{max(MIN_TRIALS, 2 * folds)}"
        )
    order = np.random.default_rng(seed).permutation(len(data))
    cut = round(holdout * len(data))
    heldout = {
        objective: _scored(data, order[cut:], order[:cut], schema, objective, seed)
        for objective in OBJECTIVES
    }
    chunks = np.array_split(order, folds)
    kfold = {}
    for objective in OBJECTIVES:
        runs = [
            _scored(data, np.concatenate(chunks[:k] + chunks[k + 1 :]), chunk, schema, objective, seed)
            for k, chunk in enumerate(chunks)
        ]
        kfold[objective] = {metric: _spread([run[metric] for run in runs]) for metric in METRICS}
    return {
        "study": data.study,
        "quality": data.quality_name,
        "trials": len(data),
        "heldout_trials": cut,
        "folds": folds,
        "seed": seed,
        **heldout["regression"],
        "heldout": heldout,
        "kfold": kfold,
    }


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report as table rows: one per split and objective."""
    split = f"held-out {report['heldout_trials']}/{report['trials']}"
    rows = [{"split": split, "objective": name, **metrics} for name, metrics in report["heldout"].items()]
    for name, metrics in report["kfold"].items():
        rows.append(
            {"split": f"{report['folds']}-fold mean", "objective": name,
             **{metric: spread["mean"] for metric, spread in metrics.items()}}
        )
    return rows


def _scored(
    data: TrainingSet, train: np.ndarray, test: np.ndarray, schema: FeatureSchema, objective: str,
    seed: int,
) -> dict[str, float | None]:
    predictor = Predictor.fit(data.subset(train), schema, objective, seed)  # type: ignore[arg-type]
    held = data.subset(test)
    return prediction_metrics(
        predictor.scores(held.features), held.quality, held.nonzeros, objective == "regression"
    )


def _spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(known)), "std": float(np.std(known))}
