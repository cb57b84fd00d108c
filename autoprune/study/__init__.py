"""Multi-objective searches: workers, executors, storages and the Optuna ask/tell driver."""

from autoprune.study._config import EXECUTORS, SAMPLERS, SearchConfig
from autoprune.study._driver import SearchSummary, front_size, run_search
from autoprune.study._executor import Executor, InProcessExecutor
from autoprune.study._export import ExportResult, export_trial
from autoprune.study._finish import heal_front
from autoprune.study._heal import (
    HealedMember,
    StudyHealer,
    artifact_store,
    load_healed_weights,
    member_row,
    recorded_heal,
)
from autoprune.study._heal_select import select_by_healing, selection_candidates
from autoprune.study._proposing import Proposal, Proposer, ProposerFactory, SearchSetup
from autoprune.study._records import (
    counts_toward_budget,
    find_trial,
    front_trials,
    member_at,
    pareto_trials,
    recorded_sequential_ppl,
    trial_plan,
    trial_row,
)
from autoprune.study._settings import StudySettings, study_settings, trial_recipe
from autoprune.study._storage import (
    DEFAULT_STORAGE,
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    load_existing_study,
    mask_url,
    open_storage,
    opened_storage,
    storage_file,
    write_ahead,
)
from autoprune.study._tasks import recorded_task_scores, score_trials_on_tasks
from autoprune.study._worker import (
    Objective,
    TrialRequest,
    TrialResult,
    TrialStatus,
    TrialWorker,
    WorkerSpec,
    space_context,
)
from autoprune.study.refine import (
    EvolutionState,
    RefineConfig,
    RefineSummary,
    find_refinement,
    refine_trial,
)

__all__ = [
    "DEFAULT_STORAGE",
    "EXECUTORS",
    "EvolutionState",
    "PASSWORD_ENV",
    "PASSWORD_FILE_ENV",
    "SAMPLERS",
    "Executor",
    "ExportResult",
    "HealedMember",
    "InProcessExecutor",
    "Objective",
    "Proposal",
    "Proposer",
    "ProposerFactory",
    "RefineConfig",
    "RefineSummary",
    "SearchConfig",
    "SearchSetup",
    "SearchSummary",
    "connect_ray",
    "StudyHealer",
    "StudySettings",
    "TrialRequest",
    "TrialResult",
    "TrialStatus",
    "TrialWorker",
    "WorkerSpec",
    "artifact_store",
    "counts_toward_budget",
    "export_trial",
    "find_refinement",
    "find_trial",
    "front_size",
    "front_trials",
    "heal_front",
    "load_healed_weights",
    "member_at",
    "member_row",
    "load_existing_study",
    "mask_url",
    "open_storage",
    "opened_storage",
    "pareto_trials",
    "recorded_heal",
    "recorded_sequential_ppl",
    "recorded_task_scores",
    "refine_trial",
    "run_search",
    "score_trials_on_tasks",
    "select_by_healing",
    "space_context",
    "selection_candidates",
    "storage_file",
    "study_settings",
    "trial_plan",
    "trial_recipe",
    "trial_row",
    "write_ahead",
]


def connect_ray(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``auto`` or ``HOST:PORT``; None starts a local Ray unless
    ``RAY_ADDRESS`` names one), or say in one line why not; whether it is a local one. Imported on
    use, so only what asks for Ray loads it."""
    from autoprune.study._ray import connect

    return connect(address)
