"""Scoring a study's trials on lm-eval tasks and keeping the scores in the study.

Optuna refuses to change a finished trial, so the scores of trial ``N`` are kept as the study
attribute ``tasks:N`` (one per trial, so two runs scoring different trials never overwrite each
other); :func:`recorded_task_scores` reads them back for ``front`` and the dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autoprune.api import prepare
from autoprune.models import compute_device
from autoprune.pruner import Pruner
from autoprune.study._settings import trial_recipe
from autoprune.tasks import run_tasks, task_manager, task_scores

TASKS_ATTR_PREFIX = "tasks:"


def score_trials_on_tasks(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    tasks: Sequence[str],
    include_path: Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: bool = False,
) -> dict[int, dict[str, Any]]:
    """Rebuild each trial's model as the study measured it (its recipe, one-shot, from the cached
    calibration), score it on ``tasks`` and record the scores in the study. The study's trials
    share one model and calibration, so both are prepared once and each plan is applied to it."""
    manager = task_manager(tasks, include_path)
    compute = compute_device(device)
    scores: dict[int, dict[str, Any]] = {}
    if not trials:
        return scores
    first = trial_recipe(study, trials[0])
    loaded, stats, _ = prepare(first.model, first.calibration, cache_dir, progress, compute)
    loaded.model.to(compute)
    pruner = Pruner(loaded, stats)
    for trial in trials:
        with pruner.applied(trial_recipe(study, trial).plan) as model:
            rows = run_tasks(model, loaded.tokenizer, tasks, manager, limit)
        recorded = {**recorded_task_scores(study, trial.number), **task_scores(rows, limit)}
        study.set_user_attr(f"{TASKS_ATTR_PREFIX}{trial.number}", recorded)
        scores[trial.number] = recorded
    return scores


def recorded_task_scores(study: optuna.Study, number: int) -> dict[str, Any]:
    """The task scores recorded for trial ``number`` (empty when none)."""
    return dict(study.user_attrs.get(f"{TASKS_ATTR_PREFIX}{number}", {}))
