"""A heal's checkpoints in a folder: the latest state, written whole or not at all.

One file, replaced atomically at every checkpoint (a kill while writing leaves the previous one),
stamped with the student it belongs to, so a folder left by another heal is refused rather than
resumed into the wrong model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from autoprune.errors import AutopruneError

_STATE = "heal-state.pt"


class FolderCheckpoints:
    """The :class:`autoprune.training.Checkpoints` of one heal of the student named ``identity``."""

    def __init__(self, folder: Path, identity: str) -> None:
        self.folder, self.identity = folder, identity

    def load(self) -> dict[str, Any] | None:
        path = self.folder / _STATE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a file that is not a checkpoint: say which, in one line
            raise AutopruneError(f"heal checkpoint {path} is unreadable ({type(error).__name__})") from None
        if state.get("identity") != self.identity:
            raise AutopruneError(
                f"heal checkpoint folder {self.folder} belongs to another student; remove it or "
                "choose another --checkpoint-dir"
            )
        return state

    def save(self, state: dict[str, Any], step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=self.folder, prefix=".partial-", suffix=".pt")
        os.close(handle)
        try:
            torch.save({**state, "identity": self.identity}, staging)
            os.replace(staging, self.folder / _STATE)
        finally:
            Path(staging).unlink(missing_ok=True)

    def remove(self) -> None:
        """Drop the folder once the heal's result is saved."""
        shutil.rmtree(self.folder, ignore_errors=True)
