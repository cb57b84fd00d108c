"""Calibration statistics, collected once per model and data and cached on disk."""

from autoprune.calibration._collect import CalibrationResult, calibrate, default_cache_dir
from autoprune.calibration._stats import CalibrationStats, LinearStats

__all__ = [
    "CalibrationResult",
    "CalibrationStats",
    "LinearStats",
    "calibrate",
    "default_cache_dir",
]
