"""Calibration statistics, collected once per model and data and cached on disk."""

from autoprune.calibration._collect import (
    BlockEdit,
    CalibrationResult,
    block_passes,
    calibrate,
    default_cache_dir,
    statistics_folder,
)
from autoprune.calibration._self_text import self_calibration_windows
from autoprune.calibration._stats import CalibrationStats, LinearStats

__all__ = [
    "BlockEdit",
    "CalibrationResult",
    "CalibrationStats",
    "LinearStats",
    "block_passes",
    "calibrate",
    "default_cache_dir",
    "self_calibration_windows",
    "statistics_folder",
]
