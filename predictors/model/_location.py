"""Where a study's predictor lives by default: beside the study's storage file."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import make_url

from autoprune.errors import AutopruneError
from autoprune.study._storage import JOURNAL_PREFIX, mask_url, storage_url

PREDICTOR_SUFFIX = ".predictor.json"


def default_predictor_path(storage: str, study: str) -> Path:
    """``sqlite:///runs/x.db`` and study ``s`` give ``runs/x.s.predictor.json`` (the metadata goes
    to ``runs/x.s.predictor.meta.json``). A server storage has no file to sit beside: pass a path."""
    url = storage_url(storage)
    if url.startswith(JOURNAL_PREFIX):
        file = Path(url[len(JOURNAL_PREFIX) :])
    else:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            raise AutopruneError(
                f"storage {mask_url(url)} is not a file to save the predictor beside; pass --out PATH.json"
            )
        file = Path(parsed.database)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study)
    return file.with_name(f"{file.stem}.{safe}{PREDICTOR_SUFFIX}")
