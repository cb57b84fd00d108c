"""Who drives a study: a lease renewed by a heartbeat, stale trials told apart from live ones.

One driver per study at a time, enforced: a search holds the study's *lease* while it writes the
study and refuses to start while another driver's lease is live, naming it (host, pid, last
heartbeat). The lease is a RUNNING trial in a companion study ``STUDY:driver-lease`` whose system
attributes hold the driver's host, pid, grace period and heartbeat time; a thread renews the
heartbeat every ``AUTOPRUNE_HEARTBEAT_S`` seconds (10 by default) and stamps every trial the driver
has in flight with the same heartbeat (``autoprune:heartbeat``; RDB storages also get Optuna's own
trial heartbeat). Why a trial and not a study attribute: creating a trial is atomic on every
Optuna storage (RDB and journal file alike) and carries its attributes with it, so two drivers
starting together both see both claims, and the earlier claim (lower trial id) wins; a study
attribute offers no compare-and-set. Why our own heartbeat: Optuna 5's journal storage has none.

A lease, and a trial, is *stale* once its heartbeat is more than the grace period old
(``AUTOPRUNE_HEARTBEAT_GRACE_S``, 60 s by default; it must exceed the interval, and any clock
skew between the hosts). Only then is the driver taken for dead: the next search takes its lease
over and re-queues its RUNNING trials (``reason="orphaned"``). A trial whose heartbeat is fresh is
never touched. A driver that finds its lease taken over (it was frozen past the grace period, or
cut off from the storage) stops asking for trials; the results it still gets for trials the new
driver already failed are dropped with one log line each, never a traceback.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from autoprune.errors import AutopruneError
from autoprune.study._records import ORPHANED
from autoprune.study._storage import LEASE_SUFFIX, running_trial, stored_params

HEARTBEAT_ATTR = "autoprune:heartbeat"
INTERVAL_ENV = "AUTOPRUNE_HEARTBEAT_S"
GRACE_ENV = "AUTOPRUNE_HEARTBEAT_GRACE_S"
_DEFAULT_INTERVAL_S, _DEFAULT_GRACE_S = 10.0, 60.0
#: How long a claim waits before it reads the other claims: longer than any write takes to commit.
_SETTLE_S = 0.5
_LOG = logging.getLogger("autoprune.study")


def heartbeat_settings() -> tuple[float, float]:
    """The heartbeat interval and grace period in seconds, from the environment."""
    values = []
    for name, default in ((INTERVAL_ENV, _DEFAULT_INTERVAL_S), (GRACE_ENV, _DEFAULT_GRACE_S)):
        text = os.environ.get(name, "")
        try:
            value = float(text) if text else default
        except ValueError:
            raise AutopruneError(f"{name} must be a number of seconds, got {text!r}") from None
        if not value > 0:
            raise AutopruneError(f"{name} must be positive, got {text!r}")
        values.append(value)
    interval, grace = values
    if grace <= interval:
        raise AutopruneError(f"{GRACE_ENV} ({grace:g} s) must exceed {INTERVAL_ENV} ({interval:g} s)")
    return interval, grace


def last_heartbeat(trial: FrozenTrial) -> float:
    """When ``trial`` last showed a sign of life (its heartbeat, else its start), as a Unix time."""
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


@dataclass
class _Claim:
    trial_id: int
    host: str
    pid: int
    grace: float
    beat: float

    @classmethod
    def of(cls, trial: FrozenTrial, trial_id: int) -> _Claim:
        attrs = trial.system_attrs
        return cls(trial_id, attrs.get("host", "?"), attrs.get("pid", -1), attrs.get("grace", 0.0),
                   last_heartbeat(trial))

    def live(self, now: float) -> bool:
        return now - self.beat <= self.grace


class DriverLease:
    """The lease of one study, claimed by :meth:`acquire` and renewed by a thread."""

    def __init__(
        self, storage: BaseStorage, study: str, interval: float, grace: float, label: str | None = None
    ) -> None:
        """``study`` names what is leased (a study, or a refinement: any name); ``label`` says
        what it is in messages ("study 'NAME'" by default)."""
        self.storage, self.study, self.interval, self.grace = storage, study, interval, grace
        self.label = label or f"study {study!r}"
        self.lost = False
        self._trial_id: int | None = None
        self._in_flight: Callable[[], Iterable[int]] = tuple
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Refuse (:class:`AutopruneError`) if another driver's lease is live; writes nothing, so
        a search calls it before its slow preparation."""
        try:
            lock = optuna.load_study(study_name=self.study + LEASE_SUFFIX, storage=self.storage)
        except KeyError:
            return
        self._refuse_unless_mine(self._claims(lock), time.time())

    def acquire(self) -> None:
        """Claim the lease; an :class:`AutopruneError` naming the live holder if there is one.
        A stale holder's claim is failed: its driver is taken for dead."""
        lock = optuna.create_study(
            storage=self.storage, study_name=self.study + LEASE_SUFFIX,
            directions=[StudyDirection.MINIMIZE], load_if_exists=True,
        )
        attrs = {"host": platform.node(), "pid": os.getpid(), "grace": self.grace, HEARTBEAT_ATTR: time.time()}
        claim = create_trial(state=TrialState.RUNNING, system_attrs=attrs)
        lock_id = self.storage.get_study_id_from_name(lock.study_name)
        self._trial_id = self.storage.create_new_trial(lock_id, template_trial=claim)
        time.sleep(_SETTLE_S)
        claims = self._claims(lock)
        try:
            self._refuse_unless_mine(claims, time.time())
        except AutopruneError:
            _finish_quietly(self.storage, self._trial_id)
            raise
        for stale in claims:
            if stale.trial_id != self._trial_id:
                _finish_quietly(self.storage, stale.trial_id)
        self._thread = threading.Thread(target=self._beat, name="autoprune-heartbeat", daemon=True)
        self._thread.start()

    def _claims(self, lock: optuna.Study) -> list[_Claim]:
        lock_id = self.storage.get_study_id_from_name(lock.study_name)
        return [
            _Claim.of(t, self.storage.get_trial_id_from_study_id_trial_number(lock_id, t.number))
            for t in lock.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ]

    def _refuse_unless_mine(self, claims: list[_Claim], now: float) -> None:
        """The earliest live claim holds the lease: refuse unless it is this driver's."""
        holder = min((c for c in claims if c.live(now)), key=lambda c: c.trial_id, default=None)
        if holder is not None and holder.trial_id != self._trial_id:
            raise AutopruneError(
                f"{self.label} is driven by another process ({holder.host} pid {holder.pid}, "
                f"last heartbeat {now - holder.beat:.0f} s ago); stop it or let it finish, then run "
                f"this again (a driver that died is taken over {holder.grace:.0f} s after its last "
                f"heartbeat)"
            )

    def track(self, in_flight: Callable[[], Iterable[int]]) -> None:
        """From now on also stamp the trials of the leased study whose numbers ``in_flight()``
        returns at every heartbeat."""
        self._in_flight = in_flight

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew()

    def renew(self) -> None:
        """One heartbeat: the lease's and every in-flight trial's. A failed write is retried at
        the next beat (the grace period spans several); a lease finished by another driver is lost."""
        now = time.time()
        try:
            self.storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, now)
        except UpdateFinishedTrialError:
            if not self.lost:
                _LOG.warning("autoprune: the lease on %s was taken over by another driver; "
                             "no more work is started here", self.label)
            self.lost = True
            return
        except Exception as error:  # a storage hiccup: the next beat tries again
            _LOG.warning("autoprune: heartbeat of %s not written (%s)", self.label, type(error).__name__)
            return
        in_flight = list(self._in_flight())
        if not in_flight:
            return
        try:
            study_id = self.storage.get_study_id_from_name(self.study)
        except Exception:  # a hiccup: the next beat stamps them
            return
        for number in in_flight:
            try:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, now)
                if isinstance(self.storage, RDBStorage):
                    self.storage.record_heartbeat(trial_id)  # Optuna's own, for its tools
            except Exception:  # finished meanwhile, or a hiccup: the next beat stamps it
                pass

    def release(self, clean: bool) -> None:
        """Stop the heartbeat; on a ``clean`` exit (nothing left RUNNING) also give the lease
        back, so the next driver starts at once. Otherwise the lease goes stale like a killed
        driver's, and the trials left RUNNING are re-queued once theirs have."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if clean and self._trial_id is not None and not self.lost:
            _finish_quietly(self.storage, self._trial_id, TrialState.COMPLETE)


def _finish_quietly(storage: BaseStorage, trial_id: int, state: TrialState = TrialState.FAIL) -> None:
    try:
        storage.set_trial_state_values(trial_id, state=state, values=[0.0] if state == TrialState.COMPLETE else None)
    except UpdateFinishedTrialError:
        pass  # another driver finished it first: the same outcome


def lease_for(storage: BaseStorage, study: str, label: str | None = None) -> DriverLease:
    """The lease of ``study`` with the heartbeat settings of the environment; :meth:`DriverLease.check`
    refuses early if another driver holds it."""
    lease = DriverLease(storage, study, *heartbeat_settings(), label=label)
    lease.check()
    return lease


@contextmanager
def holding(lease: DriverLease) -> Iterator[DriverLease]:
    """Hold ``lease`` for the ``with`` block (see :class:`DriverLease`)."""
    lease.acquire()
    clean = False
    try:
        yield lease
        clean = True
    except KeyboardInterrupt:
        clean = True  # the driver re-queued its in-flight trials itself
        raise
    finally:
        lease.release(clean)


class RaceOutcome:
    """Whether the storage writes in a :func:`lost_race` block found their trial finished."""

    lost = False


@contextmanager
def lost_race(number: int) -> Iterator[RaceOutcome]:
    """Run storage writes for trial ``number``; if another driver finished it first (it took the
    lease over and failed the trial as orphaned), log one line instead of raising."""
    outcome = RaceOutcome()
    try:
        yield outcome
    except (UpdateFinishedTrialError, ValueError) as error:
        if isinstance(error, ValueError) and not str(error).startswith("Cannot tell a"):
            raise  # not a lost race (study.tell says "Cannot tell a FAIL trial." for one)
        outcome.lost = True
        _LOG.warning("autoprune: trial %d was already finished by another driver (taken over as "
                     "orphaned); this driver's result for it is dropped", number)


def requeue_stale(study: optuna.Study, storage: BaseStorage, grace: float) -> int:
    """RUNNING trials whose heartbeat is more than ``grace`` seconds old (a dead driver's): failed
    as orphans, their parameters queued again. A trial with a fresh heartbeat is left alone."""
    now = time.time()
    stale = [
        frozen
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if now - last_heartbeat(frozen) > grace
    ]
    for frozen in stale:
        with lost_race(frozen.number):
            requeue(study, running_trial(study, storage, frozen.number), stored_params(frozen))
    return len(stale)


def requeue(study: optuna.Study, trial: optuna.Trial, params: dict[str, Any]) -> None:
    """Tell ``trial`` FAIL (``reason="orphaned"``) and enqueue its parameters to run again. The
    first write raises :class:`UpdateFinishedTrialError`, before anything is enqueued, when another
    driver finished the trial already."""
    trial.set_user_attr("reason", ORPHANED)
    if params:
        carried = {key: value for key, value in trial.user_attrs.items() if key == "baseline"}
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number, **carried})
    trial.set_user_attr("status", "failed")
    study.tell(trial, state=TrialState.FAIL)
