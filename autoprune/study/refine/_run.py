"""``refine_trial``: the stage as a whole, from a study's trial to a new trial in that study."""

from __future__ import annotations

import time
from functools import partial

import torch
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.study._objectives import LATENCY_TABLE_ATTR, check_latency_table
from autoprune.study._records import find_trial, trial_plan, trial_row
from autoprune.study._settings import study_settings
from autoprune.study._liveness import holding, lease_for
from autoprune.study._storage import load_existing_study, opened_storage
from autoprune.study._worker import TrialRequest, TrialWorker
from autoprune.study.refine._checkpoint import checkpoint_key, load_checkpoint, save_checkpoint
from autoprune.study.refine._config import RefineConfig, RefineSummary
from autoprune.study.refine._evolution import LevelSwitchEvolution, check_refinable
from autoprune.study.refine._record import find_refinement, record_refinement


def refine_trial(config: RefineConfig, progress: bool = False) -> RefineSummary:
    """Refine one complete trial's plan and add the result to its study as a new trial.

    The same command is safe to run again: a refinement the study already holds is reported, not
    repeated, and one that was stopped goes on from its last generation (each generation leaves a
    checkpoint in the study; the trial is only added at the end, so the study never holds half a
    refinement). One process at a time runs a refinement (its checkpoints have one writer): a
    second one on the same trial and settings refuses while the first one's lease is live (see
    :mod:`autoprune.study._liveness`)."""
    trial = find_trial(load_existing_study(config.storage, config.study), config.trial)  # bad input: nothing written
    if "plan" in trial.user_attrs:
        check_refinable(trial_plan(trial), config)
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
    saved = load_checkpoint(study, config)
    if saved is not None and saved.generation > config.generations:
        raise AutopruneError(
            f"this refinement stopped at generation {saved.generation}, past --generations "
            f"{config.generations}; ask for {saved.generation} or more"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    worker = TrialWorker(
        settings.worker_spec(
            cache_dir=config.cache_dir, device=config.device, eval_batch=config.eval_batch,
            database=config.database_settings(),
        ),
        progress=progress,
    )
    if worker.latency is not None:  # the refined trial is priced like the study's others, or refused
        check_latency_table(study, {LATENCY_TABLE_ATTR: worker.latency.digest})
    base = trial_plan(parent)
    if config.method is not None:
        base = base.model_copy(update={"method": config.method})
    evolution = LevelSwitchEvolution(worker, base, config)
    state = evolution.run(saved, partial(save_checkpoint, study, config), progress)
    plan = evolution.plan_of(state.counts)
    number = len(study.get_trials(deepcopy=False))
    result = worker.run(TrialRequest(number, plan))  # a sub-network plan: the worker cuts it
    sequential = (
        evolution.measure_sequential(state, number, progress)
        if config.sequential_every is not None or config.measure_sequential
        else None
    )
    for variant, measured in (("refined plan", result), ("refined plan --sequential", sequential)):
        if measured is not None and measured.status != "complete":
            raise AutopruneError(f"the {variant} did not measure: {measured.status}")
    seconds = time.perf_counter() - start + (saved.seconds if saved is not None else 0.0)
    trial = record_refinement(study, parent, plan, result, config, state, seconds, sequential)
    evolution.release_statistics()
    return RefineSummary(
        parent.number, trial.number, config.generations, state.accepted, seconds, trial_row(trial),
        state.history,
    )
