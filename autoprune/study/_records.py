"""What a study stores per trial and how it is read back (front, export, experiments).

The study's own settings (model, calibration, space...) are in :mod:`autoprune.study._settings`.
Objective values are the study's costs then its quality, all minimized (``[decoder linear
non-zeros, quality]`` unless its config chose others, see :mod:`autoprune.study._objectives`). Everything else lives
in user attributes, written by the driver only:

- at ask time: ``plan`` (the Plan as JSON data), ``plan_summary``, ``expected_nonzeros``,
  ``stop_above`` (the multi-fidelity threshold, or null), ``driver`` (host:pid that asked it),
  ``baseline`` (label, baselines only), ``seed`` (label, the space's seeded guesses only),
  ``retry_of`` (for a re-run orphan), ``proposed`` (for a proposer's candidate);
- at tell time: ``status`` (complete / stopped_early / collapsed / failed / duplicate), ``ppl``,
  ``kl``, ``quality`` (null where not finite), ``size`` (SizeReport as a dict, with ``sparsity``),
  ``windows`` (validation windows evaluated), ``seconds`` (prune / evaluate / bookkeeping / total;
  bookkeeping includes the driver's own ask/cast/record time), ``worker``, ``retries`` (times its
  worker died and it was started again elsewhere), and ``reason`` for
  trials told FAIL (``orphaned``, ``collapsed``, ``duplicate``, or the worker's error);
- for a trial ``autoprune refine`` added: the same measured attributes, ``refined_from`` (the
  parent trial, whose parameters it carries although its plan is per-layer), ``refine`` (the
  evolution's settings, generations accepted, first and last fitness, seconds) and, when refined
  for the sequential recipe or asked to measure it, ``sequential`` (``ppl``, ``kl``, ``quality``
  of the plan pruned block after block, on the same windows: what ``export --sequential`` gives).

States: COMPLETE trials were measured on every window; PRUNED trials were stopped early; FAIL
trials are the rest. Only COMPLETE trials (and only feasible ones under constraints) form the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.plan import Plan

BASELINES_ATTR = "baselines_enqueued"
ORPHANED = "orphaned"


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Non-dominated complete (and feasible) trials, densest first."""
    return sorted(pareto_trials(study.get_trials(deepcopy=False)), key=lambda trial: -trial.values[0])


def pareto_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """What ``study.best_trials`` gives, in trial order: the complete trials no other dominates
    (both objectives minimized), only feasible ones once any trial carries constraints, ties all
    kept. ``best_trials`` deep-copies every trial of the study first (~2 s at 250 trials, paid
    per screening round); this reads the trials as they are."""
    constrained = any(trial.constraints for trial in trials)
    eligible = [
        trial
        for trial in trials
        if trial.state == TrialState.COMPLETE
        and not (constrained and any(value > 0 for value in trial.constraints.values()))
    ]
    if not eligible:
        return []
    on_front = moocore.is_nondominated(np.array([trial.values for trial in eligible]), keep_weakly=True)
    return [trial for trial, kept in zip(eligible, on_front, strict=True) if kept]


def member_at(trials: Sequence[FrozenTrial], target: float, searched_only: bool = False) -> FrozenTrial | None:
    """The front member a user asking for ``target`` sparsity would export: of the non-dominated
    complete trials, the one with the lowest sparsity at or above ``target`` (the best quality
    among equals); None where no member is that sparse. ``searched_only`` leaves refinements out
    (they neither qualify nor dominate): the parent a search's finishing refinement starts from."""
    if searched_only:
        trials = [trial for trial in trials if "refined_from" not in trial.user_attrs]
    eligible = [
        trial for trial in pareto_trials(trials)
        if (trial.user_attrs.get("size") or {}).get("sparsity", -1.0) >= target - 1e-9
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda trial: (trial.user_attrs["size"]["sparsity"], trial.values[-1]))


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials count; orphans (killed mid-trial and re-queued) and unfinished ones do not."""
    if trial.state == TrialState.FAIL:
        return trial.user_attrs.get("reason") != ORPHANED
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.number == number:
            return trial
    span = f"0..{len(trials) - 1}" if trials else "none"
    raise AutopruneError(f"trial {number} is not in study {study.study_name!r} (trials: {span})")


def trial_plan(trial: FrozenTrial) -> Plan:
    if "plan" not in trial.user_attrs:
        raise AutopruneError(f"trial {trial.number} has no recorded plan")
    return Plan.model_validate(trial.user_attrs["plan"])


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One line of ``autoprune front``."""
    attrs = trial.user_attrs
    size = attrs.get("size") or {}
    return {
        "trial": trial.number,
        "sparsity": size.get("sparsity"),
        "nonzeros": size.get("linear_nonzeros"),
        "params": size.get("linear_params"),
        "gguf_bytes": size.get("gguf_bytes"),
        "latency_ms": size.get("latency_ms"),
        "decode_ms": size.get("decode_ms"),
        "ppl": attrs.get("ppl"),
        "kl": attrs.get("kl"),
        "ppl_sequential": recorded_sequential_ppl(trial),
        "bytes_sparse": size.get("bytes_sparse"),
        "baseline": attrs.get("baseline"),
        "plan": attrs.get("plan_summary"),
    }


def recorded_sequential_ppl(trial: FrozenTrial) -> float | None:
    """The perplexity of the trial's ``--sequential`` variant, where the study measured it (trials
    refined for it); None elsewhere."""
    return (trial.user_attrs.get("sequential") or {}).get("ppl")


def sequential_is_better(trial: FrozenTrial) -> bool:
    """Whether the study measured the trial's ``--sequential`` variant better than its one-shot
    one (on the same windows, by the study's quality): the variant ``export`` writes by default."""
    sequential = (trial.user_attrs.get("sequential") or {}).get("quality")
    one_shot = trial.user_attrs.get("quality")
    return sequential is not None and one_shot is not None and sequential < one_shot


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe numbers for user attributes: non-finite values are stored as null."""
    return value if value is not None and math.isfinite(value) else None
