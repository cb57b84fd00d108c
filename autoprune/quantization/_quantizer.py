"""Quantizing a model's tensors to a plan's types, each (tensor, type, importance) once.

A tensor quantized to a type is the same bytes in every plan that quantizes that tensor to that
type (quantization is row by row from the tensor and, with an importance matrix, its inputs'
statistics), so a search pays for each once, as it pays for each pruned level once: the
:class:`Quantizer` keeps them in memory (bounded) and in a store (the variant database, see
:mod:`autoprune.variants`), keyed by what was quantized: the tensor's name, the type, and a digest
of the values and importances, so a cut or pruned tensor is never mistaken for the dense one.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from autoprune.quantization._quantize import QuantizedTensor, quantize_tensor
from autoprune.quantization._types import gguf_type

#: Quantized bytes kept in memory, at most (a SmolLM2-135M model at 8 bits is 140 MiB).
MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class QuantJob:
    """One tensor to quantize: its name in the model (state-dict key), its name in the plan (a dense
    layer name, ``embeddings`` or ``output``), its values, type and importance matrix."""

    tensor: str
    source: str
    weight: torch.Tensor
    type: str
    imatrix: np.ndarray | None = None


class QuantStore(Protocol):
    """Where quantized tensors outlive a process: :class:`autoprune.variants.QuantizedStore`."""

    def load(self, key: tuple[str, str, str]) -> QuantizedTensor | None: ...

    def save(self, key: tuple[str, str, str], value: QuantizedTensor) -> None: ...


class Quantizer:
    """Quantized tensors by (plan name, type, digest of values and importances), newest last."""

    def __init__(self, store: QuantStore | None = None, memory_bytes: int = MEMORY_BYTES) -> None:
        self.store = store
        self.memory_bytes = memory_bytes
        self._held: OrderedDict[tuple[str, str, str], QuantizedTensor] = OrderedDict()
        self._bytes = 0
        #: Digests of tensors already hashed, by identity and version (a weak reference tells a
        #: reused identity apart): the dense weights are hashed once per process.
        self._digests: OrderedDict[int, tuple[weakref.ref, int, str]] = OrderedDict()

    def quantize(self, jobs: list[QuantJob]) -> dict[str, QuantizedTensor]:
        """Each job's tensor quantized, by its name in the model."""
        return {job.tensor: self._one(job) for job in jobs}

    def _one(self, job: QuantJob) -> QuantizedTensor:
        imatrix = job.imatrix if gguf_type(job.type).imatrix else None
        digest = self._digest(job.weight)
        if imatrix is not None:
            digest = hashlib.blake2b(
                digest.encode() + np.ascontiguousarray(imatrix, dtype=np.float32).tobytes(), digest_size=16
            ).hexdigest()
        key = (job.source, job.type, digest)
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        value = self.store.load(key) if self.store is not None else None
        if value is None:
            value = quantize_tensor(job.weight, job.type, imatrix)
            if self.store is not None:
                self.store.save(key, value)
        self._hold(key, value)
        return value

    def _hold(self, key: tuple[str, str, str], value: QuantizedTensor) -> None:
        self._held[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.memory_bytes and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._bytes -= dropped.nbytes

    def _digest(self, weight: torch.Tensor) -> str:
        """A digest of ``weight``'s shape and float32 values (hashed once per tensor and version)."""
        known = self._digests.get(id(weight))
        if known is not None and known[0]() is weight and known[1] == weight._version:
            self._digests.move_to_end(id(weight))
            return known[2]
        values = weight.detach().to("cpu", torch.float32).contiguous()
        hasher = hashlib.blake2b(str(tuple(values.shape)).encode(), digest_size=16)
        hasher.update(values.numpy().view(np.uint8).reshape(-1))
        digest = hasher.hexdigest()
        self._digests[id(weight)] = (weakref.ref(weight), weight._version, digest)
        if len(self._digests) > 4096:
            self._digests.popitem(last=False)
        return digest
