"""Screening candidates with the predictor inside ``autoprune search``."""

from predictors.screening._candidates import CandidateSampler
from predictors.screening._proposer import (
    EXPLORE_SHARE,
    MIN_CANDIDATES,
    SCREEN_FACTOR,
    PredictorProposer,
    parent_weights,
)

__all__ = [
    "EXPLORE_SHARE",
    "MIN_CANDIDATES",
    "SCREEN_FACTOR",
    "CandidateSampler",
    "PredictorProposer",
    "parent_weights",
]
