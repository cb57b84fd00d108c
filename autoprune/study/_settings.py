"""``StudySettings``: what a study's recorded numbers depend on, stored with the study.

``autoprune search`` writes them once, when it creates a study; everything that later rebuilds a
trial's model or measures it again (resume checks, ``refine``, ``export``, the predictor, the
experiments) reads them back through :func:`study_settings`, typed, so no caller parses the stored
dictionary itself. They never hold the storage URL.

The stored form is the JSON dump of the model (``sparsity_range`` as a list), the same dictionary
every version of ``autoprune search`` has written, so older studies read as they are.
"""

from __future__ import annotations

from typing import Annotated, Any

import optuna
from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoprune.config import CalibrationConfig
from autoprune.errors import AutopruneError
from autoprune.plan import MethodName, Plan, Recipe
from autoprune.study._objectives import LATENCY_COSTS, Cost
from autoprune.study._records import trial_plan
from autoprune.study._worker import Objective, WorkerSpec
from autoprune.variants import DEFAULT_GRID, DatabaseSettings
from search_spaces import SearchSpace

#: The study user attribute that holds the settings.
SETTINGS_ATTR = "autoprune"
#: What studies minimized beside the quality before costs were configurable.
DEFAULT_COSTS = ("nonzeros",)
#: What a study of GGUF types minimizes beside the quality unless its config says otherwise.
GGUF_COSTS = ("gguf_bytes",)
#: Sub-network studies always price their trials' latency (the front shows it).
SUBNET_SPACE = "subnet"


class DatabaseFields(BaseModel):
    """The variant database keys of ``search`` and ``refine`` configs (flat, so each is a flag)."""

    database: bool = Field(
        False, description="assemble plans from the variant database of pruned layers (lazily built)"
    )
    database_dir: str | None = Field(None, description="variant database folder (default: in the cache)")
    database_grid: Annotated[int, Field(ge=2)] = Field(
        DEFAULT_GRID, description="variant levels in steps of 1/GRID; allocations snap to it"
    )

    def database_settings(self) -> DatabaseSettings | None:
        return DatabaseSettings.when(self.database, self.database_dir, self.database_grid)


class StudySettings(BaseModel):
    """The settings that define what a study's numbers mean: resuming with other ones is refused,
    since old and new trials would not be comparable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="hub id, local folder, .gguf file or alias the study pruned")
    calibration: CalibrationConfig = Field(description="the calibration data of every trial")
    space: str = Field(description="search space name")
    method: MethodName = Field(description="the study's pruning method")
    objective: Objective = Field(description="quality objective: ppl or kl")
    sparsity_range: tuple[float, float] = Field(description="targets searched: LO HI")
    eval_seq_len: Annotated[int, Field(ge=2)] = Field(description="tokens per validation window")
    eval_windows: Annotated[int, Field(ge=1)] = Field(description="validation windows per trial")
    costs: tuple[Cost, ...] = Field(
        DEFAULT_COSTS, description="the costs minimized beside the quality (studies before costs: non-zeros)"
    )

    @property
    def objectives(self) -> list[str]:
        """The objective values' names, in order: the costs, then the quality."""
        return [*self.costs, self.objective]

    def worker_spec(
        self,
        *,
        cache_dir: str | None = None,
        device: str = "cpu",
        eval_batch: int = 1,
        threads: int | None = None,
        min_windows: int = WorkerSpec.model_fields["min_windows"].default,
        database: DatabaseSettings | None = None,
    ) -> WorkerSpec:
        """A worker that measures plans as this study's trials were measured; the keyword
        arguments are where and how it runs, which do not change the numbers."""
        return WorkerSpec(
            model=self.model,
            calibration=self.calibration,
            objective=self.objective,
            eval_seq_len=self.eval_seq_len,
            eval_windows=self.eval_windows,
            min_windows=min_windows,
            eval_batch=eval_batch,
            cache_dir=cache_dir,
            device=device,
            threads=threads,
            latency=bool(LATENCY_COSTS & set(self.costs)) or self.space == SUBNET_SPACE,
            database=database,
            gguf="gguf_bytes" in self.costs or SearchSpace.named(self.space).quantized,
        )

    def recipe(self, plan: Plan) -> Recipe:
        """The recipe that rebuilds ``plan``'s model in a study of these settings."""
        return Recipe(model=self.model, calibration=self.calibration, plan=plan)

    def stored(self) -> dict[str, Any]:
        """The JSON-safe dictionary kept in the study; ``costs`` only where they are not the
        default, so a study of non-zeros stores what every earlier version stored."""
        return self.model_dump(mode="json", exclude={"costs"} if self.costs == DEFAULT_COSTS else None)

    def write(self, study: optuna.Study) -> None:
        """Store these settings with ``study`` (the one place they are written)."""
        study.set_user_attr(SETTINGS_ATTR, self.stored())

    @classmethod
    def stored_in(cls, study: optuna.Study) -> StudySettings | None:
        """The settings stored with ``study``, or None where it holds none (the one place they
        are read); stored settings that do not validate are an :class:`AutopruneError`."""
        stored = study.user_attrs.get(SETTINGS_ATTR)
        if stored is None:
            return None
        try:
            return cls.model_validate(stored)
        except ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(part) for part in first["loc"]) or "settings"
            raise AutopruneError(
                f"study {study.study_name!r} has unreadable autoprune settings: {key}: {first['msg']}"
            ) from None


def study_settings(study: optuna.Study) -> StudySettings:
    """The settings ``autoprune search`` stored with ``study``."""
    settings = StudySettings.stored_in(study)
    if settings is None:
        raise AutopruneError(f"study {study.study_name!r} was not created by autoprune search")
    return settings


def trial_recipe(study: optuna.Study, trial: FrozenTrial) -> Recipe:
    """The recipe that rebuilds ``trial``'s model: model and calibration from the study, its plan."""
    return study_settings(study).recipe(trial_plan(trial))
