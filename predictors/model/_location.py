"""Where a study's predictor lives by default: beside the study's storage file."""

from __future__ import annotations

import re
from pathlib import Path

from autoprune.errors import AutopruneError
from autoprune.study import mask_url, storage_file

PREDICTOR_SUFFIX = ".predictor.json"


def default_predictor_path(storage: str, study: str) -> Path:
    """``sqlite:///runs/x.db`` and study ``s`` give ``runs/x.s.predictor.json`` (the metadata goes
    to ``runs/x.s.predictor.meta.json``). A server storage has no file to sit beside: pass a path."""
    file = storage_file(storage)
    if file is None:
        raise AutopruneError(
            f"storage {mask_url(storage)} is not a file to save the predictor beside; pass --out PATH.json"
        )
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study)
    return file.with_name(f"{file.stem}.{safe}{PREDICTOR_SUFFIX}")
