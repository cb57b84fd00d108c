"""Where an evolution stands, kept in the study after every generation so a stopped refinement
goes on exactly where it stopped (the random state included)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna

from autoprune.study.refine._config import PATH_SETTINGS, RefineConfig

#: Study attribute prefix of the checkpoints a refinement writes after every generation.
CHECKPOINT_PREFIX = "refine_checkpoint:"


@dataclass
class EvolutionState:
    """Where an evolution stands after ``generation`` generations: all it needs to go on exactly as
    if it had never stopped (the random state included), small enough to keep in the study."""

    generation: int
    counts: dict[str, int]
    accepted: int = 0
    history: list[float] = field(default_factory=list)
    #: ``random.Random.getstate()`` as JSON lists; None before the first generation.
    random_state: list[Any] | None = None
    #: Time spent in generations, summed over every run that contributed.
    seconds: float = 0.0
    #: With ``sequential_every``: the allocation whose sequential statistics rank candidates.
    statistics_from: dict[str, int] | None = None

    def restore_random(self, rng: random.Random) -> None:
        if self.random_state is not None:
            version, internal, gauss = self.random_state
            rng.setstate((version, tuple(internal), gauss))


def checkpoint_key(config: RefineConfig) -> str:
    """The study attribute holding this refinement's last generation: one per parent and path
    settings, so a different seed or step starts afresh instead of resuming a foreign walk."""
    settings = config.model_dump(include=PATH_SETTINGS)
    if settings["method"] is None:
        del settings["method"]  # so checkpoints written before the setting existed still resume
    path = json.dumps(settings, sort_keys=True)
    return f"{CHECKPOINT_PREFIX}{config.trial}:{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def load_checkpoint(study: optuna.Study, config: RefineConfig) -> EvolutionState | None:
    """The state a stopped run of this refinement left in ``study``, or None."""
    stored = study.user_attrs.get(checkpoint_key(config))
    return EvolutionState(**stored) if stored is not None else None


def save_checkpoint(study: optuna.Study, config: RefineConfig, state: EvolutionState) -> None:
    """Keep ``state`` in ``study`` under this refinement's key (a generation's last write)."""
    study.set_user_attr(checkpoint_key(config), asdict(state))
