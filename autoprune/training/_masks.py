"""Keeping a pruned model's zeros zero while it trains.

A healed variant must have exactly the sparsity it was measured and sized with: every weight that
pruning zeroed (unstructured or N:M) stays zero. The masks are taken from the weights themselves
before the first step, so any pattern a plan can make is kept without knowing the plan. A masked
weight's gradient is zeroed before the optimizer sees it (its Adam moments stay zero and weight
decay has nothing to shrink) and the weight is zeroed again after each step, so no update, however
computed, can revive it.
"""

from __future__ import annotations

import torch
from torch import nn


class SparsityMasks:
    """The zero pattern of every parameter of ``names`` that holds an exact zero, kept with the
    parameter itself (so wrapping the model, in adapters or for data-parallel training, or merging
    adapters back, changes nothing)."""

    def __init__(self, masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.masks = masks

    @classmethod
    def capture(cls, model: nn.Module, names: set[str]) -> SparsityMasks:
        """Masks (True: kept) of the parameters named in ``names`` that hold any zero."""
        masks = []
        for name, parameter in model.named_parameters():
            if name in names:
                kept = parameter.detach() != 0
                if not bool(kept.all()):
                    masks.append((parameter, kept))
        return cls(masks)

    def __len__(self) -> int:
        return len(self.masks)

    def zero_gradients(self) -> None:
        """Zero the gradients of masked weights (before the optimizer step)."""
        for parameter, kept in self.masks:
            if parameter.grad is not None:
                parameter.grad.mul_(kept)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights (after the optimizer step, and after merging adapters)."""
        for parameter, kept in self.masks:
            parameter.mul_(kept)
