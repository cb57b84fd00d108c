"""Data-free calibration text, sampled from the model once per model and settings and cached.

Sampling a calibration set token by token costs many forward passes of the model, far more than
calibrating on it. The statistics cache is keyed by the tokens, so without this cache every later
prune of the same model would sample the text again just to find its statistics already on disk.
The file carries the sha256 of its tokens in its metadata: a damaged file is sampled again (see
:mod:`autoprune._atomic`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autoprune._atomic import warn_damaged
from autoprune.calibration._collect import default_cache_dir
from autoprune.data import self_generated_windows
from autoprune.models import LoadedModel

_KEY = "input_ids"
_SHA_KEY = "sha256"


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
    if path.exists():
        windows, problem = _read_checked(path)
        if windows is not None and tuple(windows.shape) == (n_samples, seq_len):
            if problem:  # written before files carried a sha256: adopt it, adding one
                _write(path, windows)
            return windows, True
        warn_damaged("self-generated calibration text", path, problem or f"shape {tuple(windows.shape)}")
    windows = self_generated_windows(
        loaded.model, loaded.tokenizer, n_samples, seq_len, seed, progress=progress
    )
    _write(path, windows)
    return windows, False


def _write(path: Path, windows: torch.Tensor) -> None:
    """Store ``windows`` at ``path`` with their sha256, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".safetensors")
    os.close(handle)
    try:
        windows = windows.contiguous()
        save_file({_KEY: windows}, staging, metadata={_SHA_KEY: _tokens_sha256(windows)})
        os.replace(staging, path)  # atomic: a reader sees the whole file or none
    finally:
        Path(staging).unlink(missing_ok=True)


def _tokens_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()


def _read_checked(path: Path) -> tuple[torch.Tensor | None, str]:
    """The tokens stored at ``path``, or None and what is wrong with the file (cut short,
    garbled, or tokens that do not match the sha256 written with them). A readable file written
    before files carried a sha256 is returned with that as its problem."""
    try:
        with safe_open(path, "pt") as stored:
            expected = (stored.metadata() or {}).get(_SHA_KEY)
            windows = stored.get_tensor(_KEY)
    except Exception as error:  # safetensors raises its own error types for a damaged header
        return None, f"unreadable: {' '.join(str(error).split())[:120] or type(error).__name__}"
    if expected is None:
        return windows, "no sha256 in its metadata"
    if _tokens_sha256(windows) != expected:
        return None, "its tokens do not match their sha256"
    return windows, ""
