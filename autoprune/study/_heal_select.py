"""Training-aware selection (DarwinLM): which candidate at a size heals best.

One-shot quality ranks what a cut destroys, not what training can restore: two variants of the same
size need not heal alike (widths, removed blocks and unstructured allocations lose different
things). At a target, the best ``count`` complete trials by one-shot quality among those of that
size (sparsity within ``width`` above the target) each get a short heal and are ranked again by
the healed quality; the better half goes on to a heal twice as long, until one is left, which the
caller then heals with the full budget. Both rankings are recorded in the study
(``heal_selection:<target>``), with whether the pick changed; a rerun with the same settings
finds the record instead of selecting again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from autoprune.study._heal import StudyHealer
from autoprune.study._records import trial_plan
from autoprune.study._worker import TrialRequest
from autoprune.training import HealConfig

SELECTION_ATTR_PREFIX = "heal_selection:"


def selection_candidates(
    trials: Sequence[FrozenTrial], target: float, count: int, width: float,
    max_latency_ms: float | None = None,
) -> list[FrozenTrial]:
    """The ``count`` complete trials of best one-shot quality whose sparsity lies in
    ``[target, target + width]`` (and whose predicted prefill is at most ``max_latency_ms``), best
    first."""
    sized = [
        trial for trial in within_latency(trials, max_latency_ms)
        if trial.state == TrialState.COMPLETE and "plan" in trial.user_attrs
        and target - 1e-9 <= (trial.user_attrs.get("size") or {}).get("sparsity", -1.0) <= target + width
    ]
    return sorted(sized, key=lambda trial: (trial.values[-1], trial.number))[:count]


def within_latency(trials: Sequence[FrozenTrial], max_latency_ms: float | None) -> list[FrozenTrial]:
    """The trials whose predicted prefill is at most ``max_latency_ms`` (all, where None)."""
    if max_latency_ms is None:
        return list(trials)
    return [t for t in trials if (t.user_attrs.get("size") or {}).get("latency_ms", float("inf")) <= max_latency_ms]


def select_by_healing(
    healer: StudyHealer,
    target: float,
    candidates: Sequence[FrozenTrial],
    config: HealConfig,
) -> dict[str, Any]:
    """Rank ``candidates`` in stages of short heals (the first of ``config.tokens`` tokens, each
    next twice as long), halving them each stage; the record, whose ``winner`` is the last one
    left. Recorded in the study under the target."""
    key = f"{SELECTION_ATTR_PREFIX}{target:g}"
    numbers = [trial.number for trial in candidates]
    done = healer.study.user_attrs.get(key)
    if done is not None and done["digest"] == config.digest() and done["candidates"] == numbers:
        return done
    survivors, tokens, stages = list(candidates), config.tokens, []
    while len(survivors) > 1:
        stage = config.model_copy(update={"tokens": tokens})
        scored = []
        for trial in survivors:
            model, _ = healer.train(trial, stage)
            measured = healer.worker.measure(TrialRequest(trial.number, trial_plan(trial)), model)
            scored.append((measured.quality, trial.number, measured.ppl, trial))
        scored.sort(key=lambda entry: (entry[0], entry[1]))
        stages.append({
            "tokens": tokens,
            "ranking": [{"trial": number, "quality": quality, "ppl": ppl} for quality, number, ppl, _ in scored],
        })
        survivors = [entry[3] for entry in scored[: math.ceil(len(scored) / 2)]]
        tokens *= 2
    record = {
        "target": target,
        "digest": config.digest(),
        "candidates": numbers,
        "one_shot": [{"trial": t.number, "quality": t.values[-1], "ppl": t.user_attrs.get("ppl")} for t in candidates],
        "stages": stages,
        "winner": survivors[0].number,
        "changed": survivors[0].number != numbers[0],
    }
    healer.study.set_user_attr(key, record)
    return record
