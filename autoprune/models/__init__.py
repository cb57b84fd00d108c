"""Model loading and architecture adapters."""

from autoprune.models._adapter import (
    ArchitectureAdapter,
    LayerKind,
    LlamaFamilyAdapter,
    OPTAdapter,
)
from autoprune.models._device import compute_device
from autoprune.models._loading import ALIASES, LoadedModel, load_model, resolve_alias

__all__ = [
    "ALIASES",
    "ArchitectureAdapter",
    "LayerKind",
    "LlamaFamilyAdapter",
    "LoadedModel",
    "OPTAdapter",
    "compute_device",
    "load_model",
    "resolve_alias",
]
