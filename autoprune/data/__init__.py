"""Text sources and token windows."""

from autoprune.data._sources import SELF, WIKITEXT2, Role, check_source, read_text
from autoprune.data._windows import (
    calibration_ids,
    calibration_windows,
    evaluation_windows,
    self_generated_windows,
    tokenize,
    validation_windows,
    windows_fingerprint,
)

__all__ = [
    "SELF",
    "WIKITEXT2",
    "Role",
    "calibration_ids",
    "calibration_windows",
    "check_source",
    "evaluation_windows",
    "read_text",
    "self_generated_windows",
    "tokenize",
    "validation_windows",
    "windows_fingerprint",
]
