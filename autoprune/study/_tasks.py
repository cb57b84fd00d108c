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
    calibration), score it on ``tasks`` and record the scores in the study."""
    manager = task_manager(tasks, include_path)
    compute = compute_device(device)
    scores = {}
    for trial in trials:
        recipe = trial_recipe(study, trial)
        loaded, stats, _ = prepare(recipe.model, recipe.calibration, cache_dir, progress, compute)
        loaded.model.to(compute)
        model = Pruner(loaded, stats).materialize(recipe.plan)
        rows = run_tasks(model, loaded.tokenizer, tasks, manager, limit)
        recorded = {**recorded_task_scores(study, trial.number), **task_scores(rows, limit)}
        study.set_user_attr(f"{TASKS_ATTR_PREFIX}{trial.number}", recorded)
        scores[trial.number] = recorded
    return scores


def recorded_task_scores(study: optuna.Study, number: int) -> dict[str, Any]:
    """The task scores recorded for trial ``number`` (empty when none)."""
    return dict(study.user_attrs.get(f"{TASKS_ATTR_PREFIX}{number}", {}))
