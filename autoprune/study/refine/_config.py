"""What ``autoprune refine`` takes (:class:`RefineConfig`) and reports (:class:`RefineSummary`),
and the fixed shape of one generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from autoprune.plan import MethodName
from autoprune.study._settings import DatabaseFields
from autoprune.study._storage import DEFAULT_STORAGE

#: Offspring ranked on this many pool windows, each cut to ``screen_tokens``: a cheap first pass.
SCREEN_WINDOWS = 2
#: The best offspring of the first pass go on to be compared with the parent on fresh windows.
FINALISTS = 2
#: How many level switches one offspring carries: mostly one, sometimes a few (EvoPress draws
#: small mutation counts too; single switches alone get stuck where two moves only pay together).
SWITCH_COUNTS = (1, 1, 2, 3)
#: The settings that decide an evolution's path: a checkpoint is resumed only under the same ones.
PATH_SETTINGS = frozenset(
    {"offspring", "step", "pool_windows", "screen_tokens", "select_windows", "seed", "sequential_every",
     "method"}
)
#: The settings a refined trial records: a rerun with the same ones finds it instead of refining again.
RECORDED_SETTINGS = PATH_SETTINGS | {"generations", "measure_sequential"}


class RefineConfig(DatabaseFields):
    """What ``autoprune refine`` takes; every key is also a flag."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(DEFAULT_STORAGE, description="Optuna storage URL or path of the study")
    study: str = Field(description="study name")
    trial: int = Field(description="the complete trial whose plan is refined")
    generations: Annotated[int, Field(ge=1)] = Field(100, description="evolution steps")
    offspring: Annotated[int, Field(ge=FINALISTS)] = Field(8, description="candidates per step")
    step: Annotated[float, Field(gt=0.0, le=0.25)] = Field(
        0.025, description="sparsity one level switch moves, in the smaller layer's terms"
    )
    pool_windows: Annotated[int, Field(ge=SCREEN_WINDOWS + 1)] = Field(
        32, description="validation windows (beyond the study's own) candidates are ranked on"
    )
    screen_tokens: Annotated[int, Field(ge=2)] = Field(
        256, description="tokens per window in the first, cheap ranking of the offspring"
    )
    select_windows: Annotated[int, Field(ge=1)] = Field(
        2, description="fresh whole windows the finalists and the parent are compared on"
    )
    seed: int = Field(0, description="random seed of the mutations and the windows drawn")
    sequential_every: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="rank candidates for the --sequential recipe, from the parent's sequential "
        "statistics, recomputed every N generations (a calibration pass each)",
    )
    measure_sequential: bool = Field(
        False,
        description="also measure the refined plan as `export --sequential` makes it (a "
        "calibration pass); where that variant is better, it is what `export` writes by default",
    )
    method: MethodName | None = Field(
        None,
        description="prune the allocation with this method instead of the trial's own (e.g. admm "
        "for a plan searched with sparsegpt: a costlier prune than a search trial affords)",
    )
    cache_dir: str | None = Field(None, description="calibration cache folder")
    threads: Annotated[int, Field(ge=1)] | None = Field(None, description="torch CPU threads")
    device: str = Field("cpu", description="torch device of the evolution (cpu, cuda, cuda:N)")
    eval_batch: Annotated[int, Field(ge=1)] = Field(
        1, description="windows per forward pass (for a GPU; the same losses, more memory)"
    )

    @model_validator(mode="after")
    def _pool_holds_both_draws(self) -> RefineConfig:
        if self.pool_windows < SCREEN_WINDOWS + self.select_windows:
            raise ValueError(f"pool_windows must be at least {SCREEN_WINDOWS} + select_windows")
        return self


@dataclass
class RefineSummary:
    """The new trial, its parent, and the winner's fitness per generation (each generation on
    windows of its own, so the series is noisy; compare parent and child on the same windows)."""

    parent: int
    trial: int
    generations: int
    accepted: int
    seconds: float
    row: dict[str, Any]
    fitness: list[float] = field(default_factory=list)
    #: True when the study already held this refinement and nothing ran.
    found: bool = False

    def line(self) -> str:
        if self.found:
            return (
                f"trial {self.parent} was already refined into trial {self.trial} with these "
                "settings; nothing ran"
            )
        return (
            f"refined trial {self.parent} into trial {self.trial}: {self.accepted} of "
            f"{self.generations} generations improved it, {self.seconds:.0f} s"
        )
