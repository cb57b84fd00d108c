"""Trials on a Ray cluster: one actor per worker, each loading the model once, the driver alone
writing the storage.

Each actor reserves ``gpus_per_worker`` GPUs (fractions share one) and ``cpus_per_worker`` CPUs,
builds its :class:`TrialWorker` on first use (model, calibration statistics, validation windows) and
then measures trial after trial. Workers receive a :class:`WorkerSpec` and plans, never the storage
URL, so nothing a worker prints or logs can hold a database password.

Faults: when a worker dies mid-trial (its process killed, its node lost, Ray's memory monitor) or
runs out of GPU memory, it is replaced by a fresh actor and the trial starts again on a free worker,
up to ``max_retries`` times; after that it comes back ``failed`` with the reason, and the search
goes on. Replacing the actor ourselves rather than through Ray's ``max_restarts`` keeps the pool at
its size without having to tell a restarting actor from one gone for good, and gives an
out-of-memory worker a clean GPU. An error the trial itself raises (a bug, a plan the method
rejects) is recorded at once: it would fail again anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from subprocess import list2cmdline

import ray
import ray._private.utils
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayError, RayTaskError

from autoprune.errors import AutopruneError
from autoprune.plan import MethodName
from autoprune.study._executor import Executor, failure_reason
from autoprune.study._storage import mask_url
from autoprune.study._worker import TrialRequest, TrialResult, TrialWorker, WorkerSpec
from search_spaces import SpaceContext

WorkerFactory = Callable[[WorkerSpec], TrialWorker]
_LOG = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 10
#: How long shutdown waits for actors still being created before it kills them.
_CREATION_WAIT_S = 30.0


@ray.remote
class _Actor:
    """A worker in a Ray actor. The worker is built on first use, so a model that cannot load fails
    that call with its own error (not an anonymous actor death) and creation returns at once."""

    def __init__(self, spec: WorkerSpec, factory: WorkerFactory) -> None:
        self._spec, self._factory = spec, factory
        self._worker: TrialWorker | None = None

    def _loaded(self) -> TrialWorker:
        if self._worker is None:
            self._worker = self._factory(self._spec)
        return self._worker

    def space_context(
        self, method: MethodName, sparsity_range: tuple[float, float]
    ) -> SpaceContext:
        return self._loaded().space_context(method, sparsity_range)

    def run(self, request: TrialRequest) -> TrialResult:
        return self._loaded().run(request)

    def created(self) -> None:
        """Nothing: its first call's result says the actor exists (see :meth:`RayExecutor.shutdown`)."""


@dataclass
class _Job:
    """A submitted request and how often a worker died under it."""

    request: TrialRequest
    deaths: int = 0


class RayExecutor(Executor):
    """``workers`` Ray actors, one trial in flight on each."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        max_retries: int = 2,
        factory: WorkerFactory = TrialWorker,
    ) -> None:
        """Join the cluster at ``address`` (``auto`` or ``HOST:PORT``; None starts a local one
        unless ``RAY_ADDRESS`` names one), or use the Ray this process already joined.
        ``factory`` builds each actor's worker (experiments and tests swap in stand-ins)."""
        if gpus_per_worker > 0 and spec.device == "cpu":
            raise AutopruneError(
                "--gpus-per-worker reserves GPUs the workers would not use: add --device cuda"
            )
        self._owns_ray = not ray.is_initialized()
        local = self._owns_ray and connect(address)
        _check_resources(workers, cpus_per_worker, gpus_per_worker, local)
        self._options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        self._spec, self._factory, self._max_retries = spec, factory, max_retries
        self._creations: list[ray.ObjectRef] = []
        self._actors = [self._new_actor() for _ in range(workers)]
        self._idle: deque[ActorHandle] = deque(self._actors)
        self._queue: deque[_Job] = deque()
        self._running: dict[ray.ObjectRef, tuple[_Job, ActorHandle]] = {}

    @property
    def capacity(self) -> int:
        return len(self._actors)

    def submit(self, request: TrialRequest) -> None:
        self._queue.append(_Job(request))
        self._dispatch()

    def results(self, timeout: float | None = None) -> list[TrialResult]:
        """A trial whose worker died goes back to the queue rather than out, so this waits on until
        one comes back (or ``timeout`` passes), as the contract says."""
        deadline = None if timeout is None else time.monotonic() + timeout
        finished: list[TrialResult] = []
        while not finished:
            self._dispatch()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._running:
                return finished
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=left)
            if not ready:
                return finished
            # and whatever else finished meanwhile
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
            finished = [result for ref in ready if (result := self._collect(ref)) is not None]
        self._dispatch()
        return finished

    def in_flight(self) -> int:
        return len(self._queue) + len(self._running)

    def space_context(
        self, method: MethodName, sparsity_range: tuple[float, float]
    ) -> SpaceContext:
        """From the first worker ready; asking them all loads every worker now, in parallel, and a
        model that cannot load stops the search before its first trial."""
        refs = [actor.space_context.remote(method, sparsity_range) for actor in self._actors]
        ready, _ = ray.wait(refs, num_returns=1)
        try:
            return ray.get(ready[0])
        except RayTaskError as error:
            if isinstance(error.cause, AutopruneError):
                raise error.cause from None
            reason = _reason(error)
            raise AutopruneError(f"a Ray worker could not load the model: {reason}") from None
        except RayError as error:
            raise AutopruneError(f"a Ray worker died loading the model: {_reason(error)}") from None

    def shutdown(self) -> None:
        if ray.is_initialized():  # else the actors went with it
            # A kill that reaches an actor still being placed can land on the next actor its worker
            # process hosts instead (ray-project/ray#17369): let creation finish first, briefly.
            if self._creations:
                ray.wait(self._creations, num_returns=len(self._creations), timeout=_CREATION_WAIT_S)
            for actor in self._actors:
                ray.kill(actor)
        self._actors.clear()
        self._creations.clear()
        self._idle.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def _new_actor(self) -> ActorHandle:
        actor = _Actor.options(**self._options, max_restarts=0, max_task_retries=0).remote(
            self._spec, self._factory
        )
        self._creations.append(actor.created.remote())  # its first task: done once it exists
        return actor

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            job, actor = self._queue.popleft(), self._idle.popleft()
            self._running[actor.run.remote(job.request)] = (job, actor)

    def _collect(self, ref: ray.ObjectRef) -> TrialResult | None:
        """The result behind a finished ``ref``; None when its trial went back to the queue."""
        job, actor = self._running.pop(ref)
        try:
            result: TrialResult = ray.get(ref)
        except RayTaskError as error:
            if isinstance(error.cause, torch.OutOfMemoryError):
                return self._worker_failed(job, actor, _reason(error))
            self._idle.append(actor)
            return self._failed(job, _reason(error))
        except RayError as error:  # the worker is gone: killed, its node lost, out of host memory
            return self._worker_failed(job, actor, f"worker died: {_reason(error)}")
        self._idle.append(actor)
        result.retries = job.deaths
        return result

    def _worker_failed(self, job: _Job, actor: ActorHandle, reason: str) -> TrialResult | None:
        """Replace ``actor``; run ``job`` again first thing, or fail it once out of retries."""
        ray.kill(actor)  # a dead one: a no-op; an out-of-memory one: gives its GPU back
        self._actors[self._actors.index(actor)] = fresh = self._new_actor()
        self._idle.append(fresh)
        _LOG.warning("trial %d: %s", job.request.number, reason)
        if job.deaths >= self._max_retries:
            attempts = f" ({job.deaths + 1} attempts)" if job.deaths else ""
            return self._failed(job, reason + attempts)
        job.deaths += 1
        self._queue.appendleft(job)
        return None

    @staticmethod
    def _failed(job: _Job, reason: str) -> TrialResult:
        return TrialResult(job.request.number, "failed", error=reason, retries=job.deaths)


def connect(address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local Ray (without dashboard) when None; whether
    it is a local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        _check_reachable(address)
    entrypoint = list2cmdline(mask_url(arg) for arg in sys.orig_argv)
    try:  # "local": a new instance, even where `ray start` left one running
        with recorded_entrypoint(entrypoint):
            ray.init(address=address or "local", include_dashboard=False if address is None else None)
    except Exception as error:  # ConnectionError, ValueError, RuntimeError...: all "cannot reach"
        where = f"connect to Ray at {address}" if address else "start a local Ray"
        raise AutopruneError(f"cannot {where}: {_reason(error)}") from None
    return address is None


@contextmanager
def recorded_entrypoint(entrypoint: str) -> Iterator[None]:
    """Within it, ``ray.init`` records ``entrypoint`` as this driver's command line. Ray keeps the
    command line with the job (`ray list jobs`, the dashboard) for as long as the cluster lives, so
    a storage URL typed with its password must go there masked; Ray reads it from the process
    (``/proc``) through a private function and offers no setting for it. This is the one place
    autoprune reaches into Ray's internals; ``tests/test_library_contracts.py`` fails loudly when
    Ray no longer calls that function."""
    utils = ray._private.utils
    original = utils.get_entrypoint_name  # an AttributeError here: Ray changed, see the test
    utils.get_entrypoint_name = lambda: entrypoint
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


def _check_reachable(address: str) -> None:
    """Refuse a ``HOST:PORT`` (given, or behind ``auto`` in ``RAY_ADDRESS``) that does not accept
    connections: Ray would retry it for many minutes before saying so. Other forms (``auto`` of a
    ``ray start`` on this machine, ``ray://``) are left to Ray."""
    target = os.environ.get("RAY_ADDRESS", address) if address == "auto" else address
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        where = target if target == address else f"{target} (RAY_ADDRESS)"
        raise AutopruneError(f"cannot connect to Ray at {where}: {error.strerror or error}") from None


def _check_resources(workers: int, cpus: float, gpus: float, local: bool) -> None:
    """Refuse a pool a local Ray could never place (its actors would wait forever); on a cluster,
    which may still grow, only warn."""
    total = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        have, need = total.get(name, 0.0), workers * each
        if need <= have:
            continue
        flag = f"--{name.lower()}s-per-worker"
        message = f"{workers} workers x {flag} {each:g} need {need:g} {name}s, Ray has {have:g}"
        if local:
            raise AutopruneError(f"{message}: use fewer --workers or a smaller {flag}")
        _LOG.warning("%s; trials wait until the cluster has them", message)


def _reason(error: BaseException) -> str:
    """One line for a Ray error: the task's own exception where there is one."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        return failure_reason(error.cause)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
