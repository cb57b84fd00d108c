"""Training a compressed variant toward the dense model it came from (healing).

One package that ``autoprune heal``, a search's ``heal_targets``, training-aware selection and
learned structure all call: a chunked distillation loss (:mod:`._loss`), zero masks that keep a
pruned model's sparsity (:mod:`._masks`), training and held-out windows (:mod:`._data`), the
resumable loop (:mod:`._loop`), its checkpoints (:mod:`._checkpoints`, or Ray Train's:
:mod:`._ray`), and learned structure's gates (:mod:`._gates`, :mod:`._learned`).
"""

from autoprune.training._checkpoints import FolderCheckpoints
from autoprune.training._config import GateSettings, HealConfig, LoraSettings
from autoprune.training._data import HealData
from autoprune.training._gates import StructureGates, UnitCosts, hard_concrete, keep_probability
from autoprune.training._heal import HealReport, RayWorkers, check_teacher, heal, heal_checkpoint
from autoprune.training._learned import Budget, LearnedStructure, learn_structure, unit_costs
from autoprune.training._loop import (
    Checkpoints,
    Healer,
    HealResult,
    Measurement,
    Regularizer,
    peak_memory,
)
from autoprune.training._loss import (
    IGNORE,
    distillation_loss,
    next_token_labels,
    plain_distillation_loss,
)
from autoprune.training._masks import SparsityMasks

__all__ = [
    "IGNORE",
    "Budget",
    "Checkpoints",
    "FolderCheckpoints",
    "GateSettings",
    "HealConfig",
    "HealData",
    "HealReport",
    "HealResult",
    "Healer",
    "LearnedStructure",
    "LoraSettings",
    "Measurement",
    "RayWorkers",
    "Regularizer",
    "StructureGates",
    "SparsityMasks",
    "UnitCosts",
    "check_teacher",
    "distillation_loss",
    "heal",
    "hard_concrete",
    "heal_checkpoint",
    "keep_probability",
    "learn_structure",
    "next_token_labels",
    "peak_memory",
    "plain_distillation_loss",
    "unit_costs",
]
