"""Candidate parameters drawn from a space's own distributions: uniformly, or as offspring of parents.

Screening is only as good as what it screens. Uniform draws cover the space; offspring of the
measured front (a parent, crossed parameter by parameter with a second one half of the time, then
a few parameters mutated: a Gaussian step of ``scale`` times each range, in log space for log
distributions; categorical values redrawn) refine what already works, the way a genetic sampler
would, but many at a time, for the predictor to choose from. Everything stays inside the
distributions, so every candidate is a valid trial of the study.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search_spaces import Params


class CandidateSampler:
    """Draws parameter dicts for ``distributions`` with the given generator."""

    def __init__(self, distributions: dict[str, BaseDistribution], rng: np.random.Generator) -> None:
        unsupported = [
            name for name, d in distributions.items()
            if not isinstance(d, (FloatDistribution, IntDistribution, CategoricalDistribution))
        ]
        if unsupported:
            raise TypeError(f"cannot sample {type(distributions[unsupported[0]]).__name__}")
        self.distributions, self.rng = distributions, rng

    def uniform(self, count: int) -> list[Params]:
        return [
            {name: self._draw(d, None, 0.0) for name, d in self.distributions.items()}
            for _ in range(count)
        ]

    def offspring(
        self, parents: list[Params], count: int, scale: float, rate: float, weights: np.ndarray | None = None
    ) -> list[Params]:
        """``count`` children: each of a parent picked with probability ``weights`` (default
        uniform), crossed with probability 1/2 with a second one (each parameter from either),
        then each parameter mutated with probability ``rate``."""
        children = []
        for _ in range(count):
            first, second = (parents[int(i)] for i in self.rng.choice(len(parents), size=2, p=weights))
            second = second if self.rng.random() < 0.5 else first
            child = {}
            for name, distribution in self.distributions.items():
                value = (first if self.rng.random() < 0.5 else second)[name]
                child[name] = self._draw(distribution, value, scale) if self.rng.random() < rate else value
            children.append(child)
        return children

    def _draw(self, distribution: BaseDistribution, parent: Any, scale: float) -> Any:
        """A uniform draw (``parent`` None) or a mutation of ``parent``."""
        if isinstance(distribution, CategoricalDistribution):
            return distribution.choices[int(self.rng.integers(len(distribution.choices)))]
        assert isinstance(distribution, (FloatDistribution, IntDistribution))
        to_axis, from_axis = (math.log, math.exp) if distribution.log else (float, float)
        low, high = to_axis(distribution.low), to_axis(distribution.high)
        if parent is None:
            value = self.rng.uniform(low, high)
        else:
            value = float(np.clip(to_axis(parent) + self.rng.normal(0.0, scale * (high - low)), low, high))
        value = from_axis(value)
        if distribution.step is not None:
            steps = round((value - distribution.low) / distribution.step)
            value = min(distribution.low + steps * distribution.step, distribution.high)
        if isinstance(distribution, IntDistribution):
            return int(round(value))
        return float(min(max(value, distribution.low), distribution.high))
