"""Where text comes from: WikiText-2 on the hub, a local file or folder, or the model itself.

Each source has two sides that never mix: a calibration side (train or validation split) and an
evaluation side (the test split), following the pruning literature: calibrate on one split, report
perplexity on WikiText-2 test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from autoprune.errors import AutopruneError

Role = Literal["calibration", "evaluation"]

#: File-name fragments that mark a split inside a local folder, in order of preference.
_SPLIT_MARKERS: dict[Role, tuple[str, ...]] = {
    "calibration": ("valid", "train"),
    "evaluation": ("test",),
}
_HUB_SPLITS: dict[Role, str] = {"calibration": "train", "evaluation": "test"}

SELF = "self"
WIKITEXT2 = "wikitext2"


def check_source(source: str) -> None:
    """Fail early, before any model is loaded, on a local data path that does not exist."""
    if source not in (SELF, WIKITEXT2) and not Path(source).exists():
        raise AutopruneError(f"data path not found: {source}")


def read_text(source: str, role: Role) -> str:
    """The text of ``source`` for ``role``: a file as given, a folder's matching split, or the hub.

    Documents are joined with blank lines, as the literature does for WikiText-2.
    """
    if source == SELF:
        raise AutopruneError("data source 'self' generates calibration tokens and has no text")
    if source == WIKITEXT2:
        return _hub_wikitext2(role)
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        return _split_file(path, role).read_text(encoding="utf-8")
    raise AutopruneError(f"data path not found: {source}")


def _split_file(folder: Path, role: Role) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("README"))
    for marker in _SPLIT_MARKERS[role]:
        for candidate in files:
            if marker in candidate.name.lower():
                return candidate
    wanted = " or ".join(_SPLIT_MARKERS[role])
    raise AutopruneError(f"data folder {folder} has no {role} split (a file named *{wanted}*)")


def _hub_wikitext2(role: Role) -> str:
    try:
        import datasets
    except ImportError:
        raise AutopruneError(
            "data source 'wikitext2' needs the `datasets` package; or pass a local folder"
        ) from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=_HUB_SPLITS[role])
    except Exception as error:  # the hub raises many types (connection, offline mode, missing)
        reason = " ".join(str(error).split())[:160]
        raise AutopruneError(
            f"cannot load WikiText-2 from the hub ({reason}); pass a local folder with --data"
        ) from None
    return "\n\n".join(split["text"])
