"""Multi-objective searches: workers, executors and the Optuna ask/tell driver."""

from autoprune.study._executor import Executor, InProcessExecutor
from autoprune.study._worker import (
    Objective,
    TrialRequest,
    TrialResult,
    TrialStatus,
    TrialWorker,
    WorkerSpec,
)

__all__ = [
    "Executor",
    "InProcessExecutor",
    "Objective",
    "TrialRequest",
    "TrialResult",
    "TrialStatus",
    "TrialWorker",
    "WorkerSpec",
]
