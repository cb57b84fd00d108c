"""Accuracy predictors for pruning plans (after *Pruning Large Language Models via Accuracy
Predictor*): a gradient-boosted tree model from plan features to measured quality, trained on a
study's trials, used to screen candidates before they cost a forward pass.

    featurizer = study_featurizer(study)                  # model + cached calibration of the study
    data = training_set(study, featurizer)               # complete trials as features and quality
    predictor = Predictor.fit(data, featurizer.schema)   # baseline, then xgboost on log-quality
    predictor.save(default_predictor_path(storage, name))
    report = quality_report(data, featurizer.schema)     # held-out and k-fold rank quality
    run_search(config, proposer_factory=PredictorProposer.for_search)  # a screened search

One folder per concept: ``features`` (plans as vectors, versioned schema), ``model`` (the booster,
its data and files), ``quality`` (metrics and report), ``screening`` (the search's proposer).
"""

from predictors.features import FEATURE_SCHEMA_VERSION, Featurizer, FeatureSchema, ImportanceTable
from predictors.model import (
    Predictor,
    PredictorMeta,
    TrainingSet,
    default_predictor_path,
    study_featurizer,
    training_set,
)
from predictors.quality import prediction_metrics, quality_report, report_rows
from predictors.screening import SCREEN_FACTOR, CandidateSampler, PredictorProposer

__all__ = [
    "FEATURE_SCHEMA_VERSION",
    "SCREEN_FACTOR",
    "CandidateSampler",
    "FeatureSchema",
    "Featurizer",
    "ImportanceTable",
    "Predictor",
    "PredictorMeta",
    "PredictorProposer",
    "TrainingSet",
    "default_predictor_path",
    "prediction_metrics",
    "quality_report",
    "report_rows",
    "study_featurizer",
    "training_set",
]
