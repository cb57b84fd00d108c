"""Training a compressed variant toward the dense model it came from (healing).

One package that ``autoprune heal``, a search's ``heal_targets`` and training-aware selection all
call: a chunked distillation loss (:mod:`._loss`), zero masks that keep a pruned model's sparsity
(:mod:`._masks`), training and held-out windows (:mod:`._data`), the resumable loop
(:mod:`._loop`) and its checkpoints (:mod:`._checkpoints`).
"""

from autoprune.training._checkpoints import FolderCheckpoints
from autoprune.training._config import HealConfig, LoraSettings
from autoprune.training._data import HealData
from autoprune.training._heal import HealReport, RayWorkers, check_teacher, heal, heal_checkpoint
from autoprune.training._loop import Checkpoints, Healer, HealResult, Measurement, peak_memory
from autoprune.training._loss import (
    IGNORE,
    distillation_loss,
    next_token_labels,
    plain_distillation_loss,
)
from autoprune.training._masks import SparsityMasks

__all__ = [
    "IGNORE",
    "Checkpoints",
    "FolderCheckpoints",
    "HealConfig",
    "HealData",
    "HealReport",
    "HealResult",
    "Healer",
    "LoraSettings",
    "Measurement",
    "RayWorkers",
    "SparsityMasks",
    "check_teacher",
    "distillation_loss",
    "heal",
    "heal_checkpoint",
    "next_token_labels",
    "peak_memory",
    "plain_distillation_loss",
]
