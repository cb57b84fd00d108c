"""Plans as feature vectors: structure (sparsity per projection, N:M, removed blocks) and
calibration-derived importance (Wanda score mass removed, block influence), under a versioned
schema; for sub-network plans, what each block keeps (heads, KV groups, FFN channels, sub-blocks)
and the share of head and channel importance its cuts remove."""

from predictors.features._featurizer import KINDS, Featurizer, feature_names, projections, space_has_widths
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
    "space_has_widths",
]
