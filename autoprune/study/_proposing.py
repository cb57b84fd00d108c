"""The search's proposer hook: candidates suggested from outside the sampler.

A ``proposer(study, n) -> list[Proposal]`` may suggest candidates (a predictor screening many random
plans, say): whenever no enqueued trial is waiting, the driver asks it for ``n`` (the free executor
slots) parameter dicts of the space, which are enqueued (``skip_if_exists``) and asked before the
sampler. A proposal may also be ``(params, user_attrs)``: attributes recorded with the trial (the
predictor's estimate, say; never an objective value).

A proposer usually needs what the search learns only once it started (the space's context from a
loaded model, the distributions, the executor), so the driver takes a :data:`ProposerFactory`, the
way it takes an executor, and calls it with a :class:`SearchSetup` before the first trial. This
package never names a proposer: the caller (the CLI, for ``predictor: on``) passes one in, so the
arrows between packages point one way (``predictors`` builds on ``autoprune.study``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.study._config import SearchConfig
from autoprune.study._executor import Executor
from search_spaces import SearchSpace, SpaceContext

Proposal = dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]
Proposer = Callable[[optuna.Study, int], list[Proposal]]


@dataclass(frozen=True)
class SearchSetup:
    """What a proposer factory is given: the search's settings, its space with the model's context
    and the distributions trials are asked from, and the executor that runs them (an in-process
    one holds the dense model a proposer may reuse; see :attr:`InProcessExecutor.worker`)."""

    config: SearchConfig
    space: SearchSpace
    ctx: SpaceContext
    distributions: dict[str, BaseDistribution]
    executor: Executor
    progress: bool


ProposerFactory = Callable[[SearchSetup], Proposer]


def check_proposer(
    config: SearchConfig, proposer: Proposer | None, factory: ProposerFactory | None
) -> None:
    """Refuse, before anything loads, a proposer given twice or ``predictor: on`` with none."""
    if proposer is not None and factory is not None:
        raise AutopruneError("give a search a proposer or a proposer factory, not both")
    if config.predictor == "on" and proposer is None and factory is None:
        raise AutopruneError(
            "predictor: on needs the predictor's proposer: run_search(config, "
            "proposer_factory=predictors.PredictorProposer.for_search), as `autoprune search` does"
        )


def enqueue_proposals(study: optuna.Study, proposer: Proposer, slots: int) -> None:
    """Ask ``proposer`` for ``slots`` candidates and enqueue them, marked ``proposed``, unless
    enqueued trials (baselines, seeds, retries, earlier proposals) are still waiting."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    for proposal in proposer(study, slots):
        params, attrs = proposal if isinstance(proposal, tuple) else (proposal, {})
        study.enqueue_trial(params, user_attrs={**attrs, "proposed": True}, skip_if_exists=True)
