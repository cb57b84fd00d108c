"""How well predicted scores order measured trials, in the terms screening cares about."""

from __future__ import annotations

import math

import moocore
import numpy as np
from scipy.stats import kendalltau, spearmanr

METRICS = ("spearman", "kendall", "mape", "front_top_quartile")


def prediction_metrics(
    scores: np.ndarray, quality: np.ndarray, nonzeros: np.ndarray, regression: bool
) -> dict[str, float | None]:
    """Spearman rho and Kendall tau of ``scores`` against measured quality, the mean absolute
    percentage error of ``exp(scores)`` as quality (regression scores only), and the share of the
    measured front (in non-zeros and quality) that the scores put in their top quartile."""
    return {
        "spearman": _finite(spearmanr(scores, quality).statistic),
        "kendall": _finite(kendalltau(scores, quality).statistic),
        "mape": float(np.mean(np.abs(np.exp(scores) - quality) / quality)) if regression else None,
        "front_top_quartile": front_top_quartile(nonzeros, quality, scores),
    }


def front_top_quartile(nonzeros: np.ndarray, measured: np.ndarray, predicted: np.ndarray) -> float:
    """Share of the measured front's members among the quarter of trials that the fewest others
    are *predicted* to dominate: would screening to the best quarter have kept the front?"""
    front = moocore.is_nondominated(np.column_stack([nonzeros, measured]))
    top = np.argsort(domination_counts(nonzeros, predicted), kind="stable")[: math.ceil(len(nonzeros) / 4)]
    return float(front[top].sum() / front.sum())


def domination_counts(nonzeros: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """For each point, how many others dominate it in (non-zeros, quality), both minimized: a
    finer order than Pareto layers, which tie every point of a layer."""
    no_worse = (nonzeros[None, :] <= nonzeros[:, None]) & (quality[None, :] <= quality[:, None])
    better = (nonzeros[None, :] < nonzeros[:, None]) | (quality[None, :] < quality[:, None])
    return (no_worse & better).sum(axis=1)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined correlation (constant input) is null."""
    return float(value) if math.isfinite(value) else None
