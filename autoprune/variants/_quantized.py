"""Quantized tensors in the variant database: a tensor's GGUF bytes at a type, computed once.

A tensor quantized to a type depends only on its values, the type and (for an importance-weighted
type) its inputs' statistics, so it is the same bytes in every plan that asks for it: quantized
once, then read by every later process (a resumed search, ``refine``, ``export``). Keyed by the
tensor's name in the plan, the type and a digest of what was quantized (see
:class:`autoprune.quantization.Quantizer`); one checked file each (see
:mod:`autoprune.variants._entry`), under ``<database>/quantized/<tensor>/<type>-<digest>.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autoprune.quantization import QuantizedTensor
from autoprune.variants._entry import DatabaseCounters, read_counted, write_checked

QUANTIZED_FOLDER = "quantized"
QUANTIZED_FORMAT = "quantized-1"


class QuantizedStore:
    """The quantized tensors of one database (:class:`autoprune.quantization.QuantStore`): ``load``
    a key's tensor, or None where absent or damaged (one warning line; it is quantized again)."""

    def __init__(self, root: Path, counters: DatabaseCounters) -> None:
        self.root = root
        self.counters = counters

    def path(self, key: tuple[str, str, str]) -> Path:
        source, type_name, digest = key
        return self.root / source / f"{type_name}-{digest}.safetensors"

    def load(self, key: tuple[str, str, str]) -> QuantizedTensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        found = read_counted(
            path, self.counters, "quantized tensor",
            lambda tensors, metadata: metadata.get("format") == QUANTIZED_FORMAT
            and metadata.get("type") == key[1] and "data" in tensors,
        )
        if found is None:
            return None
        tensors, metadata = found
        rows, cols = (int(size) for size in metadata["shape"].split(","))
        return QuantizedTensor(key[1], (rows, cols), tensors["data"].numpy())

    def save(self, key: tuple[str, str, str], value: QuantizedTensor) -> None:
        path = self.path(key)
        metadata = {"format": QUANTIZED_FORMAT, "type": value.type, "shape": ",".join(map(str, value.shape))}
        self.counters.keep(
            self.root, path, lambda: write_checked(path, {"data": torch.from_numpy(value.data)}, metadata)
        )
