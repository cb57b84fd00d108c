"""Saving pruned models as plain Hugging Face checkpoints (safetensors, config, tokenizer).

Nothing is written into the destination until the checkpoint is complete: it is saved to a
sibling staging folder and renamed, so an interrupted export never leaves half a model, and a
folder that already holds anything is refused rather than overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from autoprune.errors import AutopruneError

METADATA_FILE = "autoprune.json"


def check_output_dir(out_dir: Path) -> None:
    """Refuse a destination that exists and is not an empty folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AutopruneError(f"output folder {out_dir} already exists and is not empty")


def save_checkpoint(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    metadata: dict,
    extra_files: dict[str, Path] | None = None,
) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` with autoprune's metadata beside them, and
    ``extra_files`` (name in the checkpoint -> source file: a modelling file for remote code)."""
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        if out_dir.exists():
            out_dir.rmdir()
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
