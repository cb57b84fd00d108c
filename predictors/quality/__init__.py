"""How good a predictor is: rank correlations, error and front recall on trials it never saw."""

from predictors.quality._metrics import (
    METRICS,
    domination_counts,
    front_top_quartile,
    prediction_metrics,
)
from predictors.quality._report import (
    FOLDS,
    HOLDOUT_SHARE,
    MIN_HELDOUT,
    MIN_TRIALS,
    min_complete_trials,
    quality_report,
    report_rows,
)

__all__ = [
    "FOLDS",
    "HOLDOUT_SHARE",
    "METRICS",
    "MIN_HELDOUT",
    "MIN_TRIALS",
    "domination_counts",
    "front_top_quartile",
    "min_complete_trials",
    "prediction_metrics",
    "quality_report",
    "report_rows",
]
