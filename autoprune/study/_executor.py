"""Executors run trials on workers; the search driver talks to them through this interface only.

The driver keeps up to ``capacity`` trials in flight: it submits requests and collects results, and
it alone writes the Optuna storage. An executor never loses a request silently: every submitted
request comes back from :meth:`Executor.results`, as a result or as a ``failed`` result saying why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

from autoprune.plan import MethodName
from autoprune.study._worker import TrialRequest, TrialResult, TrialWorker, WorkerSpec
from search_spaces import SpaceContext


class Executor(ABC):
    """Runs :class:`TrialRequest` s on :class:`TrialWorker` s."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many trials may be in flight at once."""

    @abstractmethod
    def submit(self, request: TrialRequest) -> None:
        """Start measuring ``request`` (may return before it is done)."""

    @abstractmethod
    def results(self, timeout: float | None = None) -> list[TrialResult]:
        """Block until at least one submitted trial finished (or ``timeout`` seconds passed) and
        return every finished one."""

    @abstractmethod
    def in_flight(self) -> int:
        """Submitted trials whose results have not been returned yet."""

    def space_context(
        self, method: MethodName, sparsity_range: tuple[float, float]
    ) -> SpaceContext | None:
        """What the search space needs to know about the model, from a worker that has it loaded,
        so the driver need not load a second copy; None where no worker can tell (the driver then
        loads the model itself)."""
        return None

    def shutdown(self) -> None:
        """Release workers. Idempotent."""


def failure_reason(error: BaseException) -> str:
    """A trial's error as the one line recorded with it (type and first line of the message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class InProcessExecutor(Executor):
    """One worker in this process, one trial at a time: the laptop default."""

    def __init__(self, spec: WorkerSpec, progress: bool = True) -> None:
        self._worker = TrialWorker(spec, progress=progress)
        self._pending: deque[TrialRequest] = deque()

    @property
    def capacity(self) -> int:
        return 1

    def submit(self, request: TrialRequest) -> None:
        self._pending.append(request)

    def results(self, timeout: float | None = None) -> list[TrialResult]:
        if not self._pending:
            return []
        request = self._pending.popleft()
        try:
            return [self._worker.run(request)]
        except Exception as error:  # a trial's failure is recorded, the search goes on
            return [TrialResult(request.number, "failed", error=failure_reason(error))]

    def in_flight(self) -> int:
        return len(self._pending)

    def space_context(
        self, method: MethodName, sparsity_range: tuple[float, float]
    ) -> SpaceContext:
        return self._worker.space_context(method, sparsity_range)

    @property
    def worker(self) -> TrialWorker:
        """The worker in this process. Its model is dense between trials (a trial's pruned weights
        are swapped back when it ends), so the search's own needs (a screening proposer's
        features) can read it there: a 7B model is then held once, not twice."""
        return self._worker
