"""Plans as feature vectors: structure (sparsity per projection, N:M, removed blocks) and
calibration-derived importance (Wanda score mass removed, block influence), under a versioned
schema."""

from predictors.features._featurizer import KINDS, Featurizer, feature_names, projections
from predictors.features._importance import ImportanceTable
from predictors.features._schema import FEATURE_SCHEMA_VERSION, FeatureSchema, layers_hash

__all__ = [
    "FEATURE_SCHEMA_VERSION",
    "KINDS",
    "FeatureSchema",
    "Featurizer",
    "ImportanceTable",
    "feature_names",
    "layers_hash",
    "projections",
]
