"""The xgboost accuracy predictor, its training data and its files."""

from predictors.model._data import TrainingSet, study_featurizer, training_set
from predictors.model._location import PREDICTOR_SUFFIX, default_predictor_path
from predictors.model._predictor import (
    BOOSTER_PARAMS,
    BOOSTING_ROUNDS,
    KEPT_FEATURE,
    Baseline,
    OBJECTIVES,
    PREDICTOR_FORMAT,
    Objective,
    Predictor,
    PredictorMeta,
    check_predictor_path,
    meta_path_of,
)

__all__ = [
    "BOOSTER_PARAMS",
    "BOOSTING_ROUNDS",
    "Baseline",
    "KEPT_FEATURE",
    "OBJECTIVES",
    "PREDICTOR_FORMAT",
    "PREDICTOR_SUFFIX",
    "Objective",
    "Predictor",
    "PredictorMeta",
    "TrainingSet",
    "check_predictor_path",
    "default_predictor_path",
    "meta_path_of",
    "study_featurizer",
    "training_set",
]
