"""A refinement's result as a trial of its study, and finding it again (a rerun with the same
settings reports it instead of refining twice)."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.plan import Plan
from autoprune.study._objectives import objective_values
from autoprune.study._settings import study_settings
from autoprune.study._worker import TrialResult
from autoprune.study.refine._checkpoint import EvolutionState
from autoprune.study.refine._config import RECORDED_SETTINGS, RefineConfig


def find_refinement(study: optuna.Study, config: RefineConfig) -> FrozenTrial | None:
    """The newest trial the study holds from refining ``config.trial`` with the same settings (a
    setting an older record lacks counts as its default): the one just recorded, right after
    :func:`record_refinement`, even where a search has added trials since."""
    wanted = config.model_dump(include=RECORDED_SETTINGS)
    defaults = {key: RefineConfig.model_fields[key].default for key in RECORDED_SETTINGS}
    for trial in reversed(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        done = trial.user_attrs.get("refine", {})
        if trial.user_attrs.get("refined_from") == config.trial and all(
            done.get(key, defaults[key]) == value for key, value in wanted.items()
        ):
            return trial
    return None


def record_refinement(
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
    parent_measured = {"max_ppl": parent.user_attrs["ppl"],
                       "max_nonzeros": parent.user_attrs["size"]["linear_nonzeros"]}
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        params=parent.params,
        distributions=parent.distributions,
        values=objective_values(study_settings(study).costs, result.size, result.quality),
        user_attrs=attrs,
        constraints={
            key: value - parent_measured[key] + measured[key]
            for key, value in parent.constraints.items()
        },
    )
    study.add_trial(trial)
    return find_refinement(study, config)  # not the last trial: a search may add trials meanwhile
