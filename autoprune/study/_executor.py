"""Executors run trials on workers; the search driver talks to them through this interface only.

The driver keeps up to ``capacity`` trials in flight: it submits requests and collects results, and
it alone writes the Optuna storage. An executor never loses a request silently: every submitted
request comes back from :meth:`Executor.results`, as a result or as a ``failed`` result saying why.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections import deque

from autoprune.study._worker import TrialRequest, TrialResult, TrialWorker, WorkerSpec


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

    def shutdown(self) -> None:
        """Release workers. Idempotent."""


class InProcessExecutor(Executor):
    """One worker in this process, one trial at a time: the laptop default."""

    def __init__(self, spec: WorkerSpec, progress: bool = True) -> None:
        self._worker = TrialWorker(spec, progress=progress)
        self._pending: deque[TrialRequest] = deque()

    @property
    def capacity(self) -> int:
        return 1

    @property
    def worker(self) -> TrialWorker:
        return self._worker

    def submit(self, request: TrialRequest) -> None:
        self._pending.append(request)

    def results(self, timeout: float | None = None) -> list[TrialResult]:
        if not self._pending:
            return []
        request = self._pending.popleft()
        try:
            return [self._worker.run(request)]
        except Exception as error:  # a trial's failure is recorded, the search goes on
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            return [TrialResult(request.number, "failed", error=reason or traceback.format_exc(1))]

    def in_flight(self) -> int:
        return len(self._pending)
