"""Structured methods: which heads and FFN channels a block keeps, as small named classes.

A method sees one consuming layer (``o_proj`` for heads, ``down_proj`` for channels) and the cached
statistics of its input, and returns the kept units; :func:`autoprune.structure.build_subnet` then
slices the block and, when the structure asks for it, corrects the consuming layer by least squares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from autoprune.calibration import LinearStats
from autoprune.errors import AutopruneError
from autoprune.structure._select import (
    UnitLayout,
    activation_scores,
    obs_select,
    select_by_scores,
    weighted_scores,
)


class StructuredMethod(ABC):
    """Chooses kept units of a consuming layer's input: ``groups_kept`` whole groups, and
    ``units_per_group`` units in each."""

    name: ClassVar[str]

    @abstractmethod
    def select(
        self,
        weight: torch.Tensor,
        stats: LinearStats,
        layout: UnitLayout,
        groups_kept: int,
        units_per_group: int,
    ) -> list[int]:
        """Sorted indices of the kept units."""

    @classmethod
    def get(cls, name: str) -> StructuredMethod:
        for sub in cls.__subclasses__():
            if sub.name == name:
                return sub()
        known = ", ".join(sorted(sub.name for sub in cls.__subclasses__()))
        raise AutopruneError(f"unknown structured method {name!r} (known: {known})")


class ActivationImportance(StructuredMethod):
    """Minitron: keep the units whose activations have the largest norm."""

    name = "activation"

    def select(self, weight, stats, layout, groups_kept, units_per_group):
        return select_by_scores(activation_scores(stats.sq_norm, layout), layout, groups_kept, units_per_group)


class WeightedImportance(StructuredMethod):
    """Activation norm times the consuming column's norm (FLAP's metric, mean taken as zero)."""

    name = "weighted"

    def select(self, weight, stats, layout, groups_kept, units_per_group):
        scores = weighted_scores(stats.sq_norm, weight, layout)
        return select_by_scores(scores, layout, groups_kept, units_per_group)


class StructuredOBS(StructuredMethod):
    """ZipLM / SlimGPT: greedy removal by the second-order cost, with updates, on X^T X."""

    name = "obs"

    def select(self, weight, stats, layout, groups_kept, units_per_group):
        return obs_select(weight, stats.xtx, layout, groups_kept, units_per_group)


class LearnedStructure(StructuredMethod):
    """Units chosen by training (hard-concrete gates, :mod:`autoprune.training._gates`): the kept
    heads and channels are the trained model's, not a choice statistics can make again."""

    name = "learned"

    def select(self, weight, stats, layout, groups_kept, units_per_group):
        raise AutopruneError(
            "a learned structure's heads and channels were chosen by training: it is rebuilt from "
            "its saved weights, not from a recipe (`autoprune prune --structured learned` learns one)"
        )
