"""Screening candidates with the predictor inside ``autoprune search``."""

from predictors.screening._candidates import CandidateSampler
from predictors.screening._proposer import (
    ENSEMBLE,
    EXPLORE_SHARE,
    MIN_CANDIDATES,
    PESSIMISM,
    SCREEN_FACTOR,
    PredictorProposer,
    parent_weights,
)

__all__ = [
    "ENSEMBLE",
    "EXPLORE_SHARE",
    "MIN_CANDIDATES",
    "PESSIMISM",
    "SCREEN_FACTOR",
    "CandidateSampler",
    "PredictorProposer",
    "parent_weights",
]
