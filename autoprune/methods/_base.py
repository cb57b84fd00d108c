"""The shared interface of pruning methods.

Every concrete subclass with a ``name`` is a method: this registry is the one list of method
names (:data:`autoprune.plan.MethodName` validates against it), so a new method is one new module.

A method instance lives as long as one dense model and its calibration statistics (in a worker,
for a whole search): whatever it derives from them that does not depend on the plan (sorted scores,
inverse Hessians) it keeps, so pruning the next plan costs only the plan-dependent work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from autoprune.calibration import LinearStats
from autoprune.errors import AutopruneError
from autoprune.plan import LayerSpec


@dataclass(frozen=True)
class LayerJob:
    """One linear layer to prune: its dense weight (never modified), statistics and target."""

    name: str
    weight: torch.Tensor
    stats: LinearStats
    spec: LayerSpec


class PruningMethod(ABC):
    """Prunes linear layers to per-layer targets from cached statistics."""

    name: ClassVar[str]

    @abstractmethod
    def prune(self, jobs: list[LayerJob]) -> dict[str, torch.Tensor]:
        """New weights for every job, by layer name; dense specs return the dense weight itself.

        Jobs come together so a method can batch layers that share work (same input statistics).
        """

    @staticmethod
    def named(name: str) -> PruningMethod:
        """A fresh instance of the method called ``name``."""
        return _registry()[PruningMethod.check_name(name)]()

    @staticmethod
    def available() -> list[str]:
        return sorted(_registry())

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` if a method has it, else an :class:`AutopruneError` naming the known ones."""
        if name not in _registry():
            known = ", ".join(PruningMethod.available())
            raise AutopruneError(f"unknown pruning method {name!r} (known: {known})")
        return name


def _registry() -> dict[str, type[PruningMethod]]:
    """Method name -> class, read anew each time so methods defined later count."""
    return {cls.name: cls for cls in _concrete_methods(PruningMethod)}


def _concrete_methods(cls: type[PruningMethod]) -> list[type[PruningMethod]]:
    found = []
    for sub in cls.__subclasses__():
        if "name" in sub.__dict__:
            found.append(sub)
        found.extend(_concrete_methods(sub))
    return found
