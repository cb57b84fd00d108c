"""One stored variant: a pruned weight in one safetensors file, whole or absent, checked on read.

Layouts, the first that applies and is smaller than the dense tensor: where every row keeps the
same number of weights (what per-row pruning and N:M leave), the kept values row by row plus their
column indices (16-bit where the width allows), which decode in one scatter; otherwise the
non-zero values in row-major order plus a bitmask of where they go (one bit per weight), which
decodes several times slower; else the dense tensor. A search assembles every trial from
these files, so decoding speed is worth the indices' extra bytes. The file's metadata holds the
sha256 of its tensors' bytes, so a garbled or truncated file is detected when read; files are
written to a ``.partial-*`` temporary and renamed into place (see :mod:`autoprune._atomic`), so a
reader never sees half of one and two processes writing the same entry leave one of their two
whole files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autoprune._atomic import warn_damaged

#: 2 added the row layout; files of format 1 (bitmask or dense) are read as before.
ENTRY_FORMAT = "2"
READABLE_FORMATS = frozenset({"1", ENTRY_FORMAT})
_SHA = "sha256"
#: Files this process has checked against their sha256, by (path, inode, size, mtime).
_VERIFIED: set[tuple[str, int, int, int]] = set()
_LOG = logging.getLogger("autoprune.cache")


@dataclass
class DatabaseCounters:
    """What a database did since it was opened (for reports and tests)."""

    read: int = 0
    written: int = 0
    rebuilt: int = 0
    bytes_written: int = 0
    damaged: list[str] = field(default_factory=list)
    #: Set once a write failed: the folder is read, not written, from then on.
    unwritable: bool = False

    def keep(self, root: Path, path: Path, write: Callable[[], int]) -> None:
        """Count the entry ``write`` stores at ``path`` (returning its bytes). A folder that
        cannot be written (a read-only share, a full disk) is said once, in one warning line, and
        not written again: what would be stored is computed as without a database (an entry is
        whole or absent, never half)."""
        if self.unwritable:
            return
        try:
            self.bytes_written += write()
        except OSError as error:
            self.unwritable = True
            _LOG.warning("autoprune: warning: variant database %s cannot be written (%s); "
                         "computing without storing", root, error.strerror or error)
            return
        self.rebuilt += str(path) in self.damaged
        self.written += 1


def read_counted(
    path: Path, counters: DatabaseCounters, what: str, accepts: Callable[[dict[str, torch.Tensor], dict[str, str]], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and metadata of the checked file ``path`` if ``accepts`` them (counted as read),
    else None: a damaged file or one of another format is said in one warning line (naming
    ``what`` it should hold) and counted, to be computed and stored again."""
    tensors, metadata, problem = read_checked(path)
    if tensors is not None and not accepts(tensors, metadata):
        tensors, problem = None, f"not a {what} file of this format"
    if tensors is None:
        warn_damaged(what, path, problem)
        counters.damaged.append(str(path))
        return None
    counters.read += 1
    return tensors, metadata


def write_entry(path: Path, weight: torch.Tensor) -> int:
    """Store ``weight`` at ``path`` atomically, in the smaller layout; its size on disk in bytes."""
    weight = weight.detach().to("cpu").contiguous()
    shape = ",".join(str(size) for size in weight.shape)
    return write_checked(path, _encode(weight), {"format": ENTRY_FORMAT, "shape": shape})


def read_entry(path: Path, like: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The weight stored at ``path`` (dtype and shape of ``like``, on its device), or None and
    what is wrong with the file: unreadable, not matching its sha256, or of another shape/dtype."""
    tensors, metadata, problem = read_checked(path)
    if tensors is None:
        return None, problem
    if metadata.get("format") not in READABLE_FORMATS:
        return None, "not a variant file of this format"
    shape = tuple(int(size) for size in metadata.get("shape", "").split(",") if size)
    if shape != tuple(like.shape):
        return None, f"shape {shape}, the layer has {tuple(like.shape)}"
    weight = _decode(tensors, shape)
    if weight.dtype != like.dtype:
        return None, f"dtype {weight.dtype}, the layer has {like.dtype}"
    return weight.to(like.device), ""


def write_checked(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Store ``tensors`` (on the CPU, contiguous) at ``path`` with ``metadata`` and their sha256,
    atomically; the file's size in bytes."""
    metadata = {**metadata, _SHA: _digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path.stat().st_size


def read_checked(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, str], str]:
    """The tensors and metadata :func:`write_checked` stored at ``path``, or None and what is
    wrong with the file (unreadable, no sha256, tensors not matching it).

    A file is checked against its sha256 the first time this process reads it; read again
    unchanged (same inode, size and modification time: entries are replaced whole, never
    edited), it is trusted. A search reads each stored level many times."""
    try:
        identity = _identity(path)
        with safe_open(path, "pt") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        return None, {}, f"unreadable: {' '.join(str(error).split())[:120] or type(error).__name__}"
    if _SHA not in metadata:
        return None, metadata, "not a variant file of this format"
    if identity not in _VERIFIED:
        if _digest(tensors) != metadata[_SHA]:
            return None, metadata, "its tensors do not match their sha256"
        _VERIFIED.add(identity)
    return tensors, metadata, ""


def _encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = weight != 0
    dense_bytes = weight.numel() * weight.element_size()
    if weight.dim() == 2 and weight.shape[0] > 0:
        per_row = keep.sum(1)
        if bool((per_row == per_row[0]).all()):
            rows, kept = weight.shape[0], int(per_row[0])
            index_dtype = torch.int16 if weight.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
            columns = keep.nonzero()[:, 1].to(index_dtype).reshape(rows, kept)  # row-major: sorted
            values = weight[keep].reshape(rows, kept)
            if values.numel() * (values.element_size() + columns.element_size()) < dense_bytes:
                return {"values": values, "columns": columns}
    values = weight[keep]
    bits = torch.from_numpy(np.packbits(keep.numpy().reshape(-1)))
    if values.numel() * values.element_size() + bits.numel() >= dense_bytes:
        return {"weight": weight}
    return {"values": values, "mask": bits}


def _decode(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "weight" in tensors:
        return tensors["weight"]
    values = tensors["values"]
    if "columns" in tensors:
        return values.new_zeros(shape).scatter_(1, tensors["columns"].long(), values)
    count = int(np.prod(shape))
    # Positions, then an indexed copy: several times faster than assigning through a boolean mask
    # (torch and numpy both turn the mask into positions first, one element at a time).
    positions = np.flatnonzero(np.unpackbits(tensors["mask"].numpy(), count=count).view(np.bool_))
    weight = values.new_zeros(count)
    weight[torch.from_numpy(positions)] = values
    return weight.reshape(shape)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _identity(path: Path) -> tuple[str, int, int, int]:
    status = path.stat()
    return str(path), status.st_ino, status.st_size, status.st_mtime_ns
