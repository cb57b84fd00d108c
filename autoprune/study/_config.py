"""``SearchConfig``: every setting of a search, validated once, from YAML and/or flags.

Each field is also a command-line flag (``sparsity_range`` is ``--sparsity-range LO HI``); the
descriptions below are the flags' help. Samplers and executors are named, and the names map to
factories here, so a new one is one entry in a dict.

The settings that define what a study's numbers mean (model, data, space, method, objective, range,
evaluation windows) are stored with the study; resuming with different ones is refused, because the
old and new trials would not be comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from optuna.samplers import (
    BaseSampler,
    NSGAIIISampler,
    NSGAIISampler,
    RandomSampler,
    TPESampler,
)
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from autoprune.config import CalibrationConfig
from autoprune.errors import AutopruneError
from autoprune.plan import MethodName
from autoprune.study._executor import Executor, InProcessExecutor
from autoprune.study._finish import FinishFields
from autoprune.study._objectives import split_objectives
from autoprune.study._settings import DEFAULT_COSTS, GGUF_COSTS, SUBNET_SPACE, DatabaseFields, StudySettings
from autoprune.study._storage import DEFAULT_STORAGE, mask_url
from autoprune.study._worker import Objective, WorkerSpec
from search_spaces import MAX_LAYER_SPARSITY, SearchSpace

#: Sampler name -> factory(seed, population size).
SAMPLERS: dict[str, Callable[[int, int], BaseSampler]] = {
    "nsga2": lambda seed, population: NSGAIISampler(population_size=population, seed=seed),
    "nsga3": lambda seed, population: NSGAIIISampler(population_size=population, seed=seed),
    "tpe": lambda seed, population: TPESampler(
        seed=seed, multivariate=True, n_startup_trials=population
    ),
    "random": lambda seed, population: RandomSampler(seed=seed),
}

#: What a sub-network study minimizes beside the quality unless its config says otherwise.
SUBNET_COSTS = ("params", "latency")

Fraction = Annotated[float, Field(ge=0.0, le=MAX_LAYER_SPARSITY)]


class SearchConfig(DatabaseFields, FinishFields):
    """One search: which model and data, where the study lives, what to search and how.

    The defaults are the main job's choices (``configs/smollm2-default.yaml``: SparseGPT
    allocations assembled from the variant database, populations of 12, 6 validation windows, the
    front members at 60% and 70% refined with ADMM's weights), so a search started with flags alone
    searches and finishes as ``make search`` does; the main job's file adds its range, baseline
    targets and time budget."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="hub id, local folder, .gguf file or alias")
    data: str = Field("wikitext2", description="calibration/validation text: PATH or wikitext2")
    storage: str = Field(
        DEFAULT_STORAGE, description="Optuna storage: path, sqlite:///, RDB URL or journal://PATH"
    )
    study: str = Field("autoprune", description="study name (the same name resumes)")
    trials: Annotated[int, Field(ge=1)] = Field(100, description="finished trials wanted in the study")
    timeout_minutes: Annotated[float, Field(gt=0)] | None = Field(
        None, description="minutes of trials after loading; then stop asking (the study stays resumable)"
    )
    sampler: str = Field("nsga2", description=f"one of {', '.join(SAMPLERS)}")
    population: Annotated[int, Field(ge=2)] = Field(12, description="NSGA population / TPE start-up trials")
    seed: int = Field(0, description="sampler seed")
    space: str = Field("layerwise", description=f"one of {', '.join(SearchSpace.available())}")
    sparsity_range: tuple[Fraction, Fraction] | None = Field(
        None, description="targets searched: LO HI (fractions of the decoder linear weights removed; "
        "default: the space's own, 0.4 0.8 for sparse spaces, 0.1 0.4 for subnet)"
    )
    baseline_targets: list[Fraction] | None = Field(
        None, description="targets of the baselines enqueued first (default: LO, mid, HI)"
    )
    seeded: bool = Field(
        True, description="after the baselines, enqueue the space's prior guesses (true/false)"
    )
    method: MethodName = Field("sparsegpt", description="pruning method")
    objective: Objective = Field("ppl", description="quality objective: ppl or kl")
    objectives: list[str] | None = Field(
        None,
        description="what the study minimizes, 2 or 3 of: ppl or kl, and nonzeros, params, bytes, "
        "latency, decode_latency, gguf_bytes (default: nonzeros and the objective; params, latency "
        "and the objective for the subnet space; gguf_bytes and the objective for spaces of GGUF "
        "types)",
    )
    executor: str = Field("in-process", description="where trials run: in-process or ray")
    ray_address: str | None = Field(
        None, description="with --executor ray: auto or HOST:PORT of a Ray cluster (unset: a local Ray)"
    )
    workers: Annotated[int, Field(ge=1)] = Field(2, description="with --executor ray: Ray actors, a trial each")
    cpus_per_worker: Annotated[float, Field(gt=0)] = Field(1.0, description="CPUs each Ray worker reserves")
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs each Ray worker reserves (fractions share one; needs --device cuda)"
    )
    max_retries: Annotated[int, Field(ge=0)] = Field(
        2, description="times a trial whose Ray worker died or ran out of memory starts again"
    )
    eval_windows: Annotated[int, Field(ge=1)] = Field(6, description="validation windows per trial")
    min_windows: Annotated[int, Field(ge=1)] = Field(2, description="windows before a trial may stop early")
    eval_batch: Annotated[int, Field(ge=1)] = Field(
        1, description="validation windows per forward pass (for a GPU; the same losses, more memory)"
    )
    early_stop_margin: Annotated[float, Field(ge=1.0)] | None = Field(
        1.2,
        description="stop a trial whose running quality (ppl or KL) exceeds the front's by this "
        "factor (null: never)",
    )
    seq_len: Annotated[int, Field(ge=2)] = Field(512, description="tokens per calibration/validation window")
    calib_samples: Annotated[int, Field(ge=1)] = Field(128, description="calibration windows")
    calib_seed: int = Field(0, description="calibration sampling seed")
    max_ppl: Annotated[float, Field(gt=0)] | None = Field(None, description="constraint: ppl at most this")
    max_nonzeros: Annotated[int, Field(ge=1)] | None = Field(
        None, description="constraint: decoder linear non-zeros at most this"
    )
    cache_dir: str | None = Field(None, description="calibration cache folder")
    device: str = Field("cpu", description="torch device of the worker")
    threads: Annotated[int, Field(ge=1)] | None = Field(None, description="torch threads of the worker")
    database: bool = Field(
        True, description="assemble plans from the variant database of pruned layers and sub-network "
        "cuts (lazily built)"
    )
    predictor: Literal["on", "off"] = Field(
        "off", description="screen candidates with the accuracy predictor after the first population"
    )

    @field_validator("sampler", "executor", "space")
    @classmethod
    def _known_name(cls, name: str, info: ValidationInfo) -> str:
        known = list(_REGISTRIES[info.field_name]())
        if name not in known:
            raise ValueError(f"unknown {info.field_name} {name!r} (known: {', '.join(known)})")
        return name

    @field_validator("predictor", mode="before")
    @classmethod
    def _switch(cls, value: object) -> object:
        """YAML 1.1 reads a bare ``on``/``off`` as a boolean."""
        return ("on" if value else "off") if isinstance(value, bool) else value

    @field_validator("sparsity_range")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"needs LO < HI, got {bounds[0]} {bounds[1]}")
        return bounds

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if self.sparsity_range is None:
            self.sparsity_range = SearchSpace.named(self.space).default_range
        if self.objectives is not None:
            try:
                _, quality = split_objectives(self.objectives)
            except AutopruneError as error:
                raise ValueError(str(error)) from None
            if "objective" in self.model_fields_set and self.objective != quality:
                raise ValueError(f"objective {self.objective!r} is not the quality objectives names ({quality!r})")
            self.objective = quality
        # A search on a cluster refines only when asked: a refinement runs in the driver's
        # process, which is not where the workers' devices are.
        self.fill_finish_defaults(self.sparsity_range, SearchSpace.named(self.space).unstructured,
                                  by_default=self.executor == "in-process")
        low, high = self.sparsity_range
        for key in ("baseline_targets", "refine_targets", "heal_targets"):
            if any(not low <= t <= high for t in getattr(self, key) or ()):
                raise ValueError(f"{key} must lie inside sparsity_range")
        if not set(self.refine_sequential) <= set(self.refine_targets):
            raise ValueError("refine_sequential must name targets of refine_targets")
        if self.learn_targets and self.space != SUBNET_SPACE:
            raise ValueError("learn_targets learns sub-networks: it goes with space subnet")
        if self.space == SUBNET_SPACE and (self.refine_method is not None or self.refine_sequential):
            raise ValueError(
                "refine_method and refine_sequential prune weights; a sub-network is refined on its "
                "widths (leave them out)"
            )
        if SearchSpace.named(self.space).quantized:
            if self.predictor == "on":
                raise ValueError("the predictor's features describe pruning, not GGUF types: leave predictor off")
            if self.refine_targets:
                raise ValueError(
                    "refine_targets are sparsities; refine a GGUF study's members by trial "
                    "(autoprune refine --trial N), at their bytes"
                )
        return self

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> SearchConfig:
        """The YAML file's keys (if any) with ``overrides`` (flags) on top; errors name the key and
        where it came from, in one line."""
        values = _read_yaml(path) if path is not None else {}
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            if not first["loc"]:
                raise AutopruneError(f"invalid search settings: {message}") from None
            key = ".".join(str(part) for part in first["loc"])
            top = str(first["loc"][0])
            where = f"--{top.replace('_', '-')}" if top in overrides else str(path)
            if first["type"] == "extra_forbidden":
                raise AutopruneError(f"{where}: unknown key {key!r}") from None
            raise AutopruneError(f"{where}: invalid {key}: {message}") from None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Reprs (logs, tracebacks) show the storage URL with its password masked."""
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name == "storage" else value

    @property
    def targets(self) -> list[float]:
        """Where baselines go: the configured targets, else the range's ends and middle."""
        low, high = self.sparsity_range
        return list(self.baseline_targets or (low, round((low + high) / 2, 4), high))

    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(
            source=self.data, n_samples=self.calib_samples, seq_len=self.seq_len, seed=self.calib_seed
        )

    def worker_spec(self) -> WorkerSpec:
        return self.settings().worker_spec(
            cache_dir=self.cache_dir, device=self.device, eval_batch=self.eval_batch,
            threads=self.threads, min_windows=self.min_windows, database=self.database_settings(),
        )

    def settings(self) -> StudySettings:
        """What the study's recorded numbers depend on; stored with it, checked on resume. Never
        the storage URL."""
        return StudySettings(
            model=self.model,
            calibration=self.calibration(),
            space=self.space,
            method=self.method,
            objective=self.objective,
            sparsity_range=self.sparsity_range,
            eval_seq_len=self.seq_len,
            eval_windows=self.eval_windows,
            costs=self.costs,
        )

    @property
    def costs(self) -> tuple[str, ...]:
        """The costs minimized beside the quality (see :mod:`autoprune.study._objectives`)."""
        if self.objectives is not None:
            return split_objectives(self.objectives)[0]
        if SearchSpace.named(self.space).quantized:
            return GGUF_COSTS
        return SUBNET_COSTS if self.space == SUBNET_SPACE else DEFAULT_COSTS

    def make_sampler(self, seed_offset: int = 0) -> BaseSampler:
        """The named sampler; ``seed_offset`` (trials already in the study) keeps a resumed run
        from replaying the first run's random draws."""
        return SAMPLERS[self.sampler](self.seed + seed_offset, self.population)

    def make_executor(self, progress: bool) -> Executor:
        return EXECUTORS[self.executor](self, progress)


#: Executor name -> factory(config, progress).
EXECUTORS: dict[str, Callable[[SearchConfig, bool], Executor]] = {
    "in-process": lambda config, progress: InProcessExecutor(config.worker_spec(), progress),
    "ray": lambda config, progress: _ray_executor(config),
}


def _ray_executor(config: SearchConfig) -> Executor:
    """Imported here, so only searches that ask for Ray load it."""
    from autoprune.study._ray import RayExecutor

    return RayExecutor(
        config.worker_spec(), config.workers, config.ray_address, config.cpus_per_worker,
        config.gpus_per_worker, config.max_retries,
    )


#: What the named fields may be (read when validating, so registrations made later count).
_REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "sampler": lambda: list(SAMPLERS),
    "executor": lambda: list(EXECUTORS),
    "space": SearchSpace.available,
}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AutopruneError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(error, "problem", None) or " ".join(str(error).split())
        raise AutopruneError(f"{path} is not valid YAML: {reason}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AutopruneError(f"{path} must be a mapping of search settings, got {type(values).__name__}")
    return values
