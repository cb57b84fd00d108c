"""The windows a heal trains on and the held-out windows it is measured on.

A text source (a WikiText-2-style folder, a file, ``wikitext2``) gives its calibration side: the
first part (the share calibration samples are drawn from) is cut into consecutive training windows;
the held-out tail, which a search scores its trials on, gives the validation windows, so a heal
never trains on what it or a study measures, and never sees the evaluation (test) split. ``self``
gives text the teacher writes (the data-free route): the last generated windows are held out.

Batches are drawn by step number alone (each pass over the training windows in a fresh order
seeded by ``seed`` and the pass), so a resumed heal, or another worker of the same heal, draws
exactly the windows an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoprune.calibration import self_calibration_windows
from autoprune.data import SELF, calibration_ids, validation_windows
from autoprune.errors import AutopruneError
from autoprune.models import LoadedModel


@dataclass
class HealData:
    """Training windows ``[n, L]`` and validation windows ``[v, L]`` of one source."""

    train: torch.Tensor
    validation: torch.Tensor
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_source(
        cls,
        source: str,
        teacher: LoadedModel,
        seq_len: int,
        validation: int,
        tokens: int,
        cache_dir: Path | None = None,
        progress: bool = False,
    ) -> HealData:
        """The windows of ``source`` (``self``: enough text for ``tokens`` written by ``teacher``,
        cached like self-generated calibration text)."""
        if source == SELF:
            count = math.ceil(tokens / seq_len) + validation
            windows, _ = self_calibration_windows(teacher, count, seq_len, 0, cache_dir, progress)
            return cls(windows[:-validation], windows[-validation:])
        usable = calibration_ids(source, teacher.tokenizer)
        count = len(usable) // seq_len
        if count < 1:
            raise AutopruneError(f"training text of {source} has {len(usable)} tokens, fewer than {seq_len}")
        held = validation_windows(source, teacher.tokenizer, seq_len, validation)
        if len(held) < validation:
            raise AutopruneError(
                f"the held-out part of {source} has {len(held)} windows of {seq_len} tokens, "
                f"fewer than the {validation} asked for"
            )
        return cls(usable[: count * seq_len].view(count, seq_len), held)

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The windows of optimizer step ``step``; with ``world`` workers, worker ``rank``'s share."""
        if batch_size % world:
            raise AutopruneError(f"a batch of {batch_size} windows does not split over {world} workers")
        first = step * batch_size
        indices = [self._index(i, seed) for i in range(first, first + batch_size)]
        share = batch_size // world
        return self.train[indices[rank * share : (rank + 1) * share]]

    def _index(self, position: int, seed: int) -> int:
        count = len(self.train)
        epoch = position // count
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(count, generator=generator)
        return int(self._orders[epoch][position % count])
