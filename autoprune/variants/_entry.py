"""One stored variant: a pruned weight in one safetensors file, whole or absent, checked on read.

Layout: the non-zero values in row-major order plus a bitmask of where they go (one bit per
weight), or the dense tensor where that is smaller (sparsity under about 1/32 for float32). The
file's metadata holds the sha256 of its tensors' bytes, so a garbled or truncated file is
detected when read; files are written to a ``.partial-*`` temporary and renamed into place
(see :mod:`autoprune._atomic`), so a reader never sees half of one and two processes writing the
same entry leave one of their two whole files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ENTRY_FORMAT = "1"
_SHA = "sha256"


def write_entry(path: Path, weight: torch.Tensor) -> int:
    """Store ``weight`` at ``path`` atomically, in the smaller layout; its size on disk in bytes."""
    weight = weight.detach().to("cpu").contiguous()
    tensors = _encode(weight)
    metadata = {
        "format": ENTRY_FORMAT,
        "shape": ",".join(str(size) for size in weight.shape),
        _SHA: _digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path.stat().st_size


def read_entry(path: Path, like: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The weight stored at ``path`` (dtype and shape of ``like``, on its device), or None and
    what is wrong with the file: unreadable, not matching its sha256, or of another shape/dtype."""
    try:
        with safe_open(path, "pt") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        return None, f"unreadable: {' '.join(str(error).split())[:120] or type(error).__name__}"
    if metadata.get("format") != ENTRY_FORMAT or _SHA not in metadata:
        return None, "not a variant file of this format"
    if _digest(tensors) != metadata[_SHA]:
        return None, "its tensors do not match their sha256"
    shape = tuple(int(size) for size in metadata.get("shape", "").split(",") if size)
    if shape != tuple(like.shape):
        return None, f"shape {shape}, the layer has {tuple(like.shape)}"
    weight = _decode(tensors, shape)
    if weight.dtype != like.dtype:
        return None, f"dtype {weight.dtype}, the layer has {like.dtype}"
    return weight.to(like.device), ""


def _encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = weight != 0
    values = weight[keep]
    bits = torch.from_numpy(np.packbits(keep.numpy().reshape(-1)))
    sparse_bytes = values.numel() * values.element_size() + bits.numel()
    if sparse_bytes >= weight.numel() * weight.element_size():
        return {"weight": weight}
    return {"values": values, "mask": bits}


def _decode(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "weight" in tensors:
        return tensors["weight"]
    values, bits = tensors["values"], tensors["mask"]
    count = int(np.prod(shape))
    # Positions, then an indexed copy: several times faster than assigning through a boolean mask
    # (torch and numpy both turn the mask into positions first, one element at a time).
    positions = np.flatnonzero(np.unpackbits(bits.numpy(), count=count).view(np.bool_))
    weight = values.new_zeros(count)
    weight[torch.from_numpy(positions)] = values
    return weight.reshape(shape)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
