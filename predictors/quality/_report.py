"""The quality report: a held-out split and k-fold cross-validation, for both objectives.

Every number comes from predictors fitted without the trials they are scored on. The held-out
split is the headline (its regression Spearman is the report's ``spearman``); k-fold says how much
that number depends on which trials were held out.

How many trials are held out decides whether the figures mean anything. With ``n`` held-out trials,
a predictor that orders them at random still scores a Spearman scattered with a standard deviation
of about ``1 / sqrt(n - 1)``: 0.58 at 4 trials (where a perfect order has a 1-in-24 chance), 0.33
at :data:`MIN_HELDOUT` (10). Below that many held-out trials (fewer than
:func:`min_complete_trials` complete trials, 32 at the default share), the report still runs (from
:data:`MIN_TRIALS` trials) but carries a ``warning`` saying so, which ``autoprune predictor report``
prints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from autoprune.errors import AutopruneError
from predictors.features import FeatureSchema
from predictors.model import OBJECTIVES, Predictor, TrainingSet
from predictors.quality._metrics import METRICS, prediction_metrics

HOLDOUT_SHARE = 0.3
FOLDS = 5
MIN_TRIALS = 10
#: Held-out trials below which the report's figures are flagged as meaningless (module doc).
MIN_HELDOUT = 10


def min_complete_trials(holdout: float = HOLDOUT_SHARE) -> int:
    """Complete trials a study needs for a ``holdout`` share of them (rounded, as the report
    splits) to be at least :data:`MIN_HELDOUT`."""
    count = MIN_HELDOUT
    while round(holdout * count) < MIN_HELDOUT:
        count += 1
    return count


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
        "warning": _too_few(data, cut, holdout),
        "folds": folds,
        "seed": seed,
        **heldout["regression"],
        "heldout": heldout,
        "kfold": kfold,
    }


def _too_few(data: TrainingSet, heldout: int, holdout: float) -> str | None:
    """The warning of a report whose held-out split is too small to mean anything, or None."""
    if heldout >= MIN_HELDOUT:
        return None
    return (
        f"study {data.study!r} has {len(data)} complete trials, so the held-out figures come from "
        f"{heldout} trials: too few to mean anything (a random order scatters by about "
        f"{1 / math.sqrt(max(heldout - 1, 1)):.2f} in Spearman); at least {min_complete_trials(holdout)} "
        f"complete trials ({MIN_HELDOUT} held out) are needed"
    )


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
