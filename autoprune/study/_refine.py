"""``autoprune refine``: per-layer evolution of one trial's allocation, at its exact size.

A study's search spaces are a few dozen numbers (a target, per-block and per-projection offsets)
cast into per-layer sparsities: coarse enough for a sampler to learn, too coarse to give each of
the hundreds of linear layers its own level. Refinement takes one measured plan and moves
sparsity between individual layers, EvoPress-style (Sieberling et al., 2025): a (1 + lambda)
evolutionary search whose only mutation is a *level switch*, which prunes one layer more and
another less by the same number of weights, so every candidate keeps the parent's exact non-zeros.

Why it is affordable: a layer's pruned weight depends only on its own statistics and its prune
count, so the parent's pruned layers are kept and a candidate prunes only the few layers its
switches touched; it costs its forward passes, not a whole-model prune.

Why it does not overfit the study's validation windows: candidates are ranked by KL to the dense
model (which predicts held-out perplexity better than perplexity does, see
``experiments/proxy_check.py``) on windows drawn afresh every generation from a pool that excludes
the study's own windows, parent and offspring always on the same windows. The result is then
measured like any trial (the study's objective, its windows, a fresh prune) and added to the
study, so ``front`` and ``export`` treat it like the rest.

For the sequential recipe (``prune --sequential``, what a user exports), an allocation tuned on
one-shot weights is tuned for the wrong model: on SmolLM2 at 60%, sequential pruning lowers a
uniform plan's perplexity by 8% and a refined plan's not at all. ``sequential_every`` ranks
candidates on weights pruned from the parent's sequential statistics instead (the inputs each layer
sees once the blocks before it are pruned to the parent's plan), recomputed from the current parent
every that many generations: near the parent, those weights are nearly each candidate's own
sequential weights, at a one-shot prune's cost per candidate and one calibration pass per refresh.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from autoprune.config import CalibrationConfig
from autoprune.data import validation_windows
from autoprune.errors import AutopruneError
from autoprune.measure import reference_logprobs, window_losses
from autoprune.methods import prune_count
from autoprune.plan import LayerSpec, MethodName, Plan
from autoprune.pruner import Pruner, sequential_statistics, sequential_statistics_folder
from autoprune.study._records import find_trial, study_settings, trial_plan, trial_row
from autoprune.study._liveness import holding, lease_for
from autoprune.study._storage import DEFAULT_STORAGE, load_existing_study, opened_storage
from autoprune.study._worker import TrialRequest, TrialResult, TrialWorker, WorkerSpec
from search_spaces import MAX_LAYER_SPARSITY

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
RECORDED_SETTINGS = PATH_SETTINGS | {"generations"}
#: Study attribute prefix of the checkpoints a refinement writes after every generation.
CHECKPOINT_PREFIX = "refine_checkpoint:"
#: Where Optuna keeps ``trial.set_constraint`` values among a trial's system attributes.
CONSTRAINTS_PREFIX = "constraints:"


class RefineConfig(BaseModel):
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


@dataclass(frozen=True)
class LevelSwitch:
    """Prune ``more_per_row`` more weights in each row of ``sparser`` and ``fewer_per_row`` fewer in
    each row of ``denser``: the same number of weights in all."""

    sparser: str
    denser: str
    more_per_row: int
    fewer_per_row: int


class Allocation:
    """Per-row prune counts of the layers being refined, and the moves that keep their total.

    ``rows * count`` is what a layer removes; a switch between layers ``a`` and ``b`` moves a
    multiple of ``lcm(rows_a, rows_b)`` weights, the smallest amount both can move in whole rows,
    sized so the smaller of the two layers moves about ``step`` of its weights.
    """

    def __init__(self, counts: dict[str, int], shapes: dict[str, tuple[int, int]], step: float) -> None:
        self.counts = dict(counts)
        self.shapes = shapes
        self.step = step

    def removed(self) -> int:
        return sum(self.shapes[name][0] * count for name, count in self.counts.items())

    def cap(self, name: str) -> int:
        """The most a row may lose: the search spaces' per-layer cap, and always one weight kept."""
        cols = self.shapes[name][1]
        return min(int(MAX_LAYER_SPARSITY * cols), cols - 1)

    def switch(self, sparser: str, denser: str) -> LevelSwitch | None:
        """The level switch between two layers, or None where either would leave its range."""
        (rows_a, cols_a), (rows_b, cols_b) = self.shapes[sparser], self.shapes[denser]
        unit = math.lcm(rows_a, rows_b)
        units = max(1, round(self.step * min(rows_a * cols_a, rows_b * cols_b) / unit))
        more, less = units * unit // rows_a, units * unit // rows_b
        if self.counts[sparser] + more > self.cap(sparser) or self.counts[denser] - less < 0:
            return None
        return LevelSwitch(sparser, denser, more, less)

    def mutated(self, rng: random.Random, switches: int) -> Allocation:
        """A copy with ``switches`` random level switches applied (fewer if none fits)."""
        child = Allocation(self.counts, self.shapes, self.step)
        names = list(self.counts)
        for _ in range(switches):
            for _attempt in range(len(names)):
                move = child.switch(*rng.sample(names, 2))
                if move is not None:
                    child.counts[move.sparser] += move.more_per_row
                    child.counts[move.denser] -= move.fewer_per_row
                    break
        return child

    def plan(self, base: Plan) -> Plan:
        """``base`` with these layers' sparsities (a count over the row width, which prunes
        exactly that count)."""
        layers = dict(base.layers)
        for name, count in self.counts.items():
            layers[name] = LayerSpec(sparsity=count / self.shapes[name][1])
        return base.model_copy(update={"layers": layers})


def refinable_layers(plan: Plan, pruner: Pruner) -> dict[str, int]:
    """Per-row prune counts of the plan's unstructured layers in kept blocks (N:M layers keep
    their pattern; a dense layer can receive sparsity)."""
    shapes = pruner.layer_shapes()
    return {
        name: prune_count(spec.sparsity, shapes[name][1])
        for name, spec in pruner.kept_layers(plan).items()
        if spec.nm is None
    }


class LevelSwitchEvolution:
    """The (1 + lambda) search over one worker's model, with every pruned layer kept."""

    def __init__(self, worker: TrialWorker, base: Plan, config: RefineConfig) -> None:
        self.worker, self.base, self.config = worker, base, config
        self.pruner = worker.pruner
        self.rng = random.Random(config.seed)
        self.kept: dict[tuple[str, int], torch.Tensor] = {}
        self.statistics_from: dict[str, int] | None = None
        spec = worker.spec
        pool = validation_windows(
            spec.calibration.source,
            worker.loaded.tokenizer,
            spec.eval_seq_len,
            spec.eval_windows + config.pool_windows,
        )[spec.eval_windows :]
        needed = SCREEN_WINDOWS + config.select_windows
        if len(pool) < needed:
            raise AutopruneError(
                f"the validation split has {len(pool)} window(s) beyond the study's "
                f"{spec.eval_windows}; refinement needs {needed}"
            )
        self.pool = pool
        self.start = Allocation(
            refinable_layers(base, self.pruner), self.pruner.layer_shapes(), config.step
        )
        self.fixed = self._prune_fixed()
        with torch.inference_mode():
            self.pool_reference = reference_logprobs(worker.loaded.model, pool)

    def run(
        self,
        state: EvolutionState | None = None,
        save: Callable[[EvolutionState], None] | None = None,
        progress: bool = False,
    ) -> EvolutionState:
        """Generations from ``state`` (the trial's own allocation when None) up to the configured
        number; ``save`` receives the state after each one, so a stopped run can go on from it."""
        state = state or EvolutionState(0, dict(self.start.counts))
        state.restore_random(self.rng)
        parent = Allocation(state.counts, self.start.shapes, self.config.step)
        statistics_from = state.statistics_from
        every = self.config.sequential_every
        if (
            every is not None and statistics_from is not None
            and state.generation % every == 0 and statistics_from != state.counts
        ):  # resumed where the statistics are refreshed: the checkpoint's are not needed again
            shutil.rmtree(self._statistics_folder(statistics_from), ignore_errors=True)
        total = self.config.generations
        bar = tqdm(
            range(state.generation, total), initial=state.generation, total=total,
            desc="refine", unit="gen", disable=not progress,
        )
        for generation in bar:
            began = time.perf_counter()
            if every is not None:
                if generation % every == 0:
                    statistics_from = dict(parent.counts)
                if statistics_from != self.statistics_from:
                    self._use_statistics(statistics_from, progress)
            kids = [
                parent.mutated(self.rng, self.rng.choice(SWITCH_COUNTS))
                for _ in range(self.config.offspring)
            ]
            screen = self._draw(SCREEN_WINDOWS)
            ranked = sorted(
                range(len(kids)),
                key=lambda i: self._fitness(kids[i], screen, self.config.screen_tokens),
            )
            finalists = [parent] + [kids[i] for i in ranked[:FINALISTS]]
            select = self._draw(self.config.select_windows)
            scores = [self._fitness(c, select, self.pool.shape[1]) for c in finalists]
            best = min(range(len(finalists)), key=scores.__getitem__)
            parent = finalists[best]
            self._forget_all_but(parent)
            version, internal, gauss = self.rng.getstate()
            state = EvolutionState(
                generation=generation + 1,
                counts=dict(parent.counts),
                accepted=state.accepted + (best > 0),
                history=[*state.history, scores[best]],
                random_state=[version, list(internal), gauss],
                seconds=state.seconds + time.perf_counter() - began,
                statistics_from=self.statistics_from,
            )
            if save is not None:
                save(state)
            bar.set_postfix(kl=f"{scores[best]:.4f}", accepted=state.accepted)
        return state

    def _prune_fixed(self) -> dict[str, torch.Tensor]:
        """The layers refinement leaves as they are (N:M, or in a removed block's place: none),
        pruned once per set of statistics."""
        return self.pruner.prune_layers(
            self.base.method,
            {
                name: spec
                for name, spec in self.pruner.kept_layers(self.base).items()
                if name not in self.start.counts
            },
        )

    def _use_statistics(self, counts: dict[str, int], progress: bool) -> None:
        """Prune candidates from the sequential statistics of the allocation ``counts`` from now
        on; layers pruned from the previous statistics are dropped, and so are those statistics
        (a model's worth of Hessians on disk; a resumed run recomputes them)."""
        previous = self.pruner.stats.folder if self.statistics_from is not None else None
        stats = sequential_statistics(
            self.worker.pruner, self.worker.calibration_windows, self.plan_of(counts),
            self.worker.cache_dir, progress,
        )
        self.pruner = Pruner(self.worker.loaded, stats)
        self.kept = {}
        self.fixed = self._prune_fixed()
        self.statistics_from = dict(counts)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def measure_sequential(
        self, state: EvolutionState, number: int, progress: bool = False
    ) -> TrialResult:
        """The final allocation as ``export --sequential`` makes it, measured like the trial: its
        own sequential statistics (one more calibration pass), then the study's windows. The
        statistics it was ranked on last (the checkpoint's, after a resume) are deleted first."""
        stale = state.statistics_from
        if stale is not None and stale != state.counts:
            shutil.rmtree(self._statistics_folder(stale), ignore_errors=True)
        if self.statistics_from != state.counts:
            self._use_statistics(state.counts, progress)
        return self.worker.run(TrialRequest(number, self.plan_of(state.counts)), self.pruner)

    def plan_of(self, counts: dict[str, int]) -> Plan:
        """The refined trial's plan with these per-row prune counts."""
        return Allocation(counts, self.start.shapes, self.config.step).plan(self.base)

    def _statistics_folder(self, counts: dict[str, int]) -> Path:
        return sequential_statistics_folder(
            self.worker.pruner, self.worker.calibration_windows, self.plan_of(counts),
            self.worker.cache_dir,
        )

    def release_statistics(self) -> None:
        """Delete the sequential statistics in use, once the refinement is recorded and no resume
        needs them (for a 7B model they are ~20 GB of Hessians)."""
        if self.statistics_from is not None:
            shutil.rmtree(self.pruner.stats.folder, ignore_errors=True)
            self.pruner, self.statistics_from = self.worker.pruner, None

    def _draw(self, count: int) -> list[int]:
        return self.rng.sample(range(len(self.pool)), count)

    @torch.inference_mode()
    def _fitness(self, allocation: Allocation, windows: list[int], tokens: int) -> float:
        """Mean per-token KL to the dense model on the first ``tokens`` of those pool windows."""
        weights = self._weights(allocation)
        total = 0.0
        with self.pruner.pointed(weights, self.base.removed_blocks) as model:
            for loss in window_losses(
                model, self.pool[windows, :tokens], self.pool_reference[windows, :tokens],
                batch_size=self.worker.spec.eval_batch,
            ):
                total += loss.kl
        return total / (len(windows) * tokens)

    def _weights(self, allocation: Allocation) -> dict[str, torch.Tensor]:
        """Every layer's weight: the fixed ones pruned once, the refined ones looked up by their
        count, pruning only the (layer, count) pairs not held yet (one batch per candidate)."""
        plan = allocation.plan(self.base)
        missing = {
            name: plan.layers[name]
            for name, count in allocation.counts.items()
            if (name, count) not in self.kept
        }
        for name, weight in self.pruner.prune_layers(plan.method, missing).items():
            self.kept[(name, allocation.counts[name])] = weight
        held = {name: self.kept[(name, count)] for name, count in allocation.counts.items()}
        return {**self.fixed, **held}

    def _forget_all_but(self, parent: Allocation) -> None:
        """Keep the parent's layers only: memory stays near one model's worth, and a candidate
        re-prunes just the few layers its switches touched (~0.05 s each on SmolLM2, against
        ~25 s of forward passes per generation)."""
        self.kept = {
            key: weight for key, weight in self.kept.items() if parent.counts[key[0]] == key[1]
        }


def refine_trial(config: RefineConfig, progress: bool = False) -> RefineSummary:
    """Refine one complete trial's plan and add the result to its study as a new trial.

    The same command is safe to run again: a refinement the study already holds is reported, not
    repeated, and one that was stopped goes on from its last generation (each generation leaves a
    checkpoint in the study; the trial is only added at the end, so the study never holds half a
    refinement). One process at a time runs a refinement (its checkpoints have one writer): a
    second one on the same trial and settings refuses while the first one's lease is live (see
    :mod:`autoprune.study._liveness`)."""
    find_trial(load_existing_study(config.storage, config.study), config.trial)  # bad input: nothing written
    with opened_storage(config.storage) as storage:
        label = f"the refinement of trial {config.trial} in study {config.study!r} with these settings"
        with holding(lease_for(storage, f"{config.study}:{checkpoint_key(config)}", label)):
            return _refine_trial(config, progress)


def _refine_trial(config: RefineConfig, progress: bool) -> RefineSummary:
    study = load_existing_study(config.storage, config.study)
    settings = study_settings(study)
    parent = find_trial(study, config.trial)
    if parent.state != TrialState.COMPLETE or "plan" not in parent.user_attrs:
        raise AutopruneError(
            f"trial {parent.number} is {parent.state.name.lower()}; only complete trials can be refined"
        )
    done = find_refinement(study, config)
    if done is not None:
        info = done.user_attrs["refine"]
        return RefineSummary(
            parent.number, done.number, config.generations, info["accepted"], info["seconds"],
            trial_row(done), found=True,
        )
    key = checkpoint_key(config)
    saved = EvolutionState(**study.user_attrs[key]) if key in study.user_attrs else None
    if saved is not None and saved.generation > config.generations:
        raise AutopruneError(
            f"this refinement stopped at generation {saved.generation}, past --generations "
            f"{config.generations}; ask for {saved.generation} or more"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    worker = TrialWorker(
        WorkerSpec(
            model=settings["model"],
            calibration=CalibrationConfig(**settings["calibration"]),
            objective=settings["objective"],
            eval_seq_len=settings["eval_seq_len"],
            eval_windows=settings["eval_windows"],
            cache_dir=config.cache_dir,
            device=config.device,
            eval_batch=config.eval_batch,
        ),
        progress=progress,
    )
    base = trial_plan(parent)
    if config.method is not None:
        base = base.model_copy(update={"method": config.method})
    evolution = LevelSwitchEvolution(worker, base, config)
    state = evolution.run(saved, lambda state: study.set_user_attr(key, asdict(state)), progress)
    plan = evolution.plan_of(state.counts)
    number = len(study.get_trials(deepcopy=False))
    result = worker.run(TrialRequest(number, plan))
    sequential = (
        evolution.measure_sequential(state, number, progress)
        if config.sequential_every is not None
        else None
    )
    for variant, measured in (("refined plan", result), ("refined plan --sequential", sequential)):
        if measured is not None and measured.status != "complete":
            raise AutopruneError(f"the {variant} did not measure: {measured.status}")
    seconds = time.perf_counter() - start + (saved.seconds if saved is not None else 0.0)
    trial = _record(study, parent, plan, result, config, state, seconds, sequential)
    evolution.release_statistics()
    return RefineSummary(
        parent.number, trial.number, config.generations, state.accepted, seconds, trial_row(trial),
        state.history,
    )


def checkpoint_key(config: RefineConfig) -> str:
    """The study attribute holding this refinement's last generation: one per parent and path
    settings, so a different seed or step starts afresh instead of resuming a foreign walk."""
    settings = config.model_dump(include=PATH_SETTINGS)
    if settings["method"] is None:
        del settings["method"]  # so checkpoints written before the setting existed still resume
    path = json.dumps(settings, sort_keys=True)
    return f"{CHECKPOINT_PREFIX}{config.trial}:{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def find_refinement(study: optuna.Study, config: RefineConfig) -> FrozenTrial | None:
    """The trial the study holds from refining ``config.trial`` with the same settings (a setting
    an older record lacks counts as its default)."""
    wanted = config.model_dump(include=RECORDED_SETTINGS)
    defaults = {key: RefineConfig.model_fields[key].default for key in RECORDED_SETTINGS}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        done = trial.user_attrs.get("refine", {})
        if trial.user_attrs.get("refined_from") == config.trial and all(
            done.get(key, defaults[key]) == value for key, value in wanted.items()
        ):
            return trial
    return None


def _record(
    study: optuna.Study,
    parent: FrozenTrial,
    plan: Plan,
    result: TrialResult,
    config: RefineConfig,
    state: EvolutionState,
    seconds: float,
    sequential: TrialResult | None,
) -> FrozenTrial:
    """Add the refined plan as a complete trial: the parent's parameters (the space cannot express
    the plan; ``refined_from`` says so), the measured values, the driver's attributes, and the
    parent's constraints re-evaluated on the new measurement. A refinement for the sequential
    recipe also keeps that variant's measurement (``sequential``: what ``export --sequential``
    gives); the objective values stay one-shot, like every other trial's, so the front compares
    like with like."""
    nonzeros = float(result.size["linear_nonzeros"])
    attrs = {
        "plan": plan.model_dump(mode="json"),
        "plan_summary": plan.summary(),
        "expected_nonzeros": int(nonzeros),
        **result.record(),
        "seconds": result.seconds,
        "refined_from": parent.number,
        "refine": {
            **config.model_dump(include=RECORDED_SETTINGS),
            "accepted": state.accepted,
            "fitness_first": state.history[0],
            "fitness_last": state.history[-1],
            "seconds": round(seconds, 1),
        },
    }
    if sequential is not None:
        record = sequential.record()
        attrs["sequential"] = {key: record[key] for key in ("ppl", "kl", "quality")}
    measured = {"max_ppl": result.ppl, "max_nonzeros": nonzeros}
    parent_measured = {"max_ppl": parent.user_attrs["ppl"], "max_nonzeros": parent.values[0]}
    constraints = {
        f"{CONSTRAINTS_PREFIX}{key}": value - parent_measured[key] + measured[key]
        for key, value in parent.constraints.items()
    }
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        params=parent.params,
        distributions=parent.distributions,
        values=[nonzeros, float(result.quality)],
        user_attrs=attrs,
        system_attrs=constraints,
    )
    study.add_trial(trial)
    return find_refinement(study, config)  # not the last trial: a search may add trials meanwhile
