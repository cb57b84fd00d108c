"""autoprune: search the Pareto front of size against quality for pruned causal LMs.

The engine in one picture: a model and calibration data give statistics once (cached); a plan (plain
data) and those statistics give a pruned model through a method; measuring it gives a record.
"""

from autoprune.api import (
    PlanRequest,
    Prepared,
    PreparedWithWindows,
    PruneReport,
    evaluate,
    prepare,
    prepare_with_windows,
    prune,
)
from autoprune.calibration import CalibrationStats, calibrate
from autoprune.config import CalibrationConfig, EvaluationConfig
from autoprune.errors import AutopruneError
from autoprune.models import LoadedModel, load_model
from autoprune.plan import LayerSpec, NMPattern, Plan, Recipe
from autoprune.pruner import Pruner

__all__ = [
    "AutopruneError",
    "CalibrationConfig",
    "CalibrationStats",
    "EvaluationConfig",
    "LayerSpec",
    "LoadedModel",
    "NMPattern",
    "Plan",
    "PlanRequest",
    "Prepared",
    "PreparedWithWindows",
    "PruneReport",
    "Pruner",
    "Recipe",
    "calibrate",
    "evaluate",
    "load_model",
    "prepare",
    "prepare_with_windows",
    "prune",
]
