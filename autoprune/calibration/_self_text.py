"""Data-free calibration text, sampled from the model once per model and settings and cached.

Sampling a calibration set token by token costs many forward passes of the model, far more than
calibrating on it. The statistics cache is keyed by the tokens, so without this cache every later
prune of the same model would sample the text again just to find its statistics already on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from autoprune.calibration._collect import default_cache_dir
from autoprune.data import self_generated_windows
from autoprune.models import LoadedModel

_KEY = "input_ids"


def self_calibration_windows(
    loaded: LoadedModel,
    n_samples: int,
    seq_len: int,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, bool]:
    """``[n_samples, seq_len]`` tokens sampled from ``loaded`` with ``seed``, and whether they came
    from the cache (keyed by the model's content, so a re-exported copy of it hits)."""
    folder = (cache_dir or default_cache_dir()) / "self-text"
    path = folder / f"{loaded.fingerprint()}-{n_samples}x{seq_len}-seed{seed}.safetensors"
    if path.is_file():
        return load_file(path)[_KEY], True
    windows = self_generated_windows(
        loaded.model, loaded.tokenizer, n_samples, seq_len, seed, progress=progress
    )
    folder.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file({_KEY: windows.contiguous()}, staging)
        os.replace(staging, path)  # atomic: a reader sees the whole file or none
    finally:
        Path(staging).unlink(missing_ok=True)
    return windows, False
