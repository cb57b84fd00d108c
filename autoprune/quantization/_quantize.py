"""One tensor quantized to one GGUF type: the bytes a GGUF file stores and the values llama.cpp
computes with.

Types the ``gguf`` package writes (``f16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``) are
quantized in Python unless an importance matrix weighs them; the others, and every weighted one,
by llama.cpp's own quantizer (:mod:`._ggml`). Both give llama.cpp's bytes (a test compares them),
and the ``gguf`` package's ``dequantize`` gives the values llama.cpp's ``to_float`` computes with,
bit for bit (a test compares those too).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from autoprune.calibration import LinearStats
from autoprune.errors import AutopruneError
from autoprune.quantization import _ggml
from autoprune.quantization._types import gguf_type


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as a GGUF file stores it: its type, shape (rows, cols) and bytes (rows x row bytes)."""

    type: str
    shape: tuple[int, int]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantized(self) -> torch.Tensor:
        """The float32 values llama.cpp computes with."""
        kind = gguf_type(self.type)
        values = gguf.quants.dequantize(self.data, kind.ggml)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape))


def importance(stats: LinearStats) -> np.ndarray:
    """llama.cpp's importance matrix of a layer: its inputs' mean square per column over the
    calibration tokens (the diagonal of X^T X over the token count)."""
    return (stats.sq_norm.double() / stats.n_tokens).float().numpy()


def quantize_tensor(weight: torch.Tensor, type_name: str, imatrix: np.ndarray | None = None) -> QuantizedTensor:
    """``weight`` (rows x cols) stored as ``type_name``, its rounding weighed by ``imatrix`` (one
    value per column) where the type uses one."""
    kind = gguf_type(type_name)
    rows, cols = weight.shape
    if not kind.holds(cols):
        raise AutopruneError(f"{type_name} stores rows in blocks of {kind.block}; this tensor's rows have {cols}")
    values = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    weights = imatrix if kind.imatrix else None
    if kind.python and weights is None:
        data = gguf.quants.quantize(values, kind.ggml)
    else:
        data = _ggml.quantize(values, int(kind.ggml), weights)
    return QuantizedTensor(type_name, (rows, cols), np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1))
