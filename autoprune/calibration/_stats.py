"""Calibration statistics: what every pruning method and layer-allocation rule reads.

Per input group of a block (the linear layers reading the same tensor) we keep the sum of squared
activations per input channel (Wanda's ||X_j||^2) and X^T X (SparseGPT's Hessian). Per block we keep
the block influence ``1 - cos(input, output)`` (ShortGPT's depth-pruning signal). Statistics live on
disk as one safetensors file per block, read lazily, so a 7B model's Hessians never all sit in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: 2: a folder is committed by its manifest (sizes and sha256, see :mod:`autoprune._atomic`).
STATS_FORMAT_VERSION = 2


@dataclass(frozen=True)
class LinearStats:
    """Statistics of the input that one or more linear layers share."""

    group: str
    sq_norm: torch.Tensor
    xtx: torch.Tensor
    n_tokens: int

    @property
    def act_norm(self) -> torch.Tensor:
        """Per input channel L2 norm of the activations over all calibration tokens (Wanda)."""
        return self.sq_norm.clamp_min(0).sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """The layer-wise reconstruction Hessian ``2 X^T X / n`` that SparseGPT inverts."""
        return self.xtx * (2.0 / self.n_tokens)


class CalibrationStats:
    """Read-only view of a statistics folder written by :func:`autoprune.calibration.calibrate`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta: dict = json.loads((folder / "meta.json").read_text())
        self.block_influence = torch.tensor(self.meta["block_influence"])
        self._group_of: dict[str, str] = self.meta["group_of"]
        self._load_block = lru_cache(maxsize=None)(self._read_block)

    @property
    def num_blocks(self) -> int:
        return len(self.meta["block_influence"])

    def layer(self, name: str) -> LinearStats:
        """Statistics of the input of the linear layer ``name`` (a full module name)."""
        group = self._group_of[name]
        tensors = self._load_block(self.meta["block_of_group"][group])
        return LinearStats(
            group=group,
            sq_norm=tensors[f"{group}.sq_norm"],
            xtx=tensors[f"{group}.xtx"],
            n_tokens=self.meta["n_tokens"],
        )

    def _read_block(self, block: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / block_file_name(block))


def block_file_name(block: int) -> str:
    return f"block_{block:04d}.safetensors"


def write_block(folder: Path, block: int, groups: dict[str, LinearStats]) -> None:
    tensors = {}
    for group, stats in groups.items():
        tensors[f"{group}.sq_norm"] = stats.sq_norm.contiguous()
        tensors[f"{group}.xtx"] = stats.xtx.contiguous()
    save_file(tensors, folder / block_file_name(block))
