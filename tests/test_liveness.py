"""The driver lease and trial heartbeats, in-process: a live holder refuses others, a stale one is
taken over, two claims at once leave one holder, only stale trials are re-queued, a lost race is
one log line."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from autoprune.cli import main
from autoprune.errors import AutopruneError
from autoprune.study._liveness import HEARTBEAT_ATTR, DriverLease, heartbeat_settings, lost_race, requeue_stale
from autoprune.study._storage import open_storage

STORAGES = ["sqlite", "journal"]
#: Long enough that a loaded machine's pauses do not make a live lease look stale.
GRACE_S = 4.0


def _url(kind: str, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'lease.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'lease.log'}"


def _ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("autoprune")]


@pytest.mark.parametrize("kind", STORAGES)
def test_a_live_lease_refuses_and_a_stale_one_is_taken_over(kind, tmp_path, caplog):
    url = _url(kind, tmp_path)
    first = DriverLease(open_storage(url, create=True), "s", interval=0.1, grace=GRACE_S)
    first.acquire()
    second = DriverLease(open_storage(url), "s", interval=0.1, grace=GRACE_S)
    time.sleep(0.3)  # heartbeats keep the first lease live past its first grace-free moments
    for attempt in (second.check, second.acquire):
        with pytest.raises(AutopruneError, match=rf"driven by another process \({platform.node()} pid {os.getpid()}"):
            attempt()
    first.release(clean=False)  # as if killed: its heartbeat stops, its lease is not given back
    with pytest.raises(AutopruneError):
        second.acquire()  # not stale yet
    time.sleep(GRACE_S + 0.2)
    second.acquire()
    with caplog.at_level(logging.WARNING):
        first.renew()  # a driver that was frozen wakes up: its lease is gone
    assert first.lost and len(_ours(caplog)) == 1 and "taken over" in _ours(caplog)[0]
    second.release(clean=True)
    third = DriverLease(open_storage(url), "s", interval=0.1, grace=GRACE_S)
    third.acquire()  # a lease given back is free at once
    third.release(clean=True)


@pytest.mark.parametrize("kind", STORAGES)
def test_two_claims_at_once_leave_one_holder(kind, tmp_path):
    url = _url(kind, tmp_path)
    open_storage(url, create=True)
    leases = [DriverLease(open_storage(url), "s", interval=0.1, grace=5.0) for _ in range(3)]
    outcomes: list[str] = []
    start = threading.Barrier(len(leases))

    def claim(lease: DriverLease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes.append("holder")
        except AutopruneError:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["holder", "refused", "refused"]
    for lease in leases:
        lease.release(clean=True)


def test_only_trials_with_a_stale_heartbeat_are_requeued(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["minimize", "minimize"])
    space = {"x": FloatDistribution(0, 1)}
    live, dead, silent = (study.ask(space) for _ in range(3))
    storage = study._storage
    storage.set_trial_system_attr(live._trial_id, HEARTBEAT_ATTR, time.time())
    storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_ATTR, time.time() - 30)
    assert requeue_stale(study, storage, grace=10.0) == 1  # ``silent`` started just now: fresh too
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[live.number] == states[silent.number] == TrialState.RUNNING
    assert states[dead.number] == TrialState.FAIL
    assert study.trials[dead.number].user_attrs["reason"] == "orphaned"
    (retry,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert retry.user_attrs["retry_of"] == dead.number


def test_a_result_for_a_trial_finished_elsewhere_is_one_log_line(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 's.db'}"
    mine = optuna.create_study(storage=url, study_name="s", directions=["minimize", "minimize"])
    trial = mine.ask({"x": FloatDistribution(0, 1)})
    theirs = optuna.load_study(study_name="s", storage=url)
    theirs.tell(trial.number, state=TrialState.FAIL)  # another driver failed it as orphaned
    with caplog.at_level(logging.WARNING):
        with lost_race(trial.number) as race:
            trial.set_user_attr("status", "complete")
        assert race.lost
        with lost_race(trial.number) as race:
            mine.tell(trial, [1.0, 2.0])
        assert race.lost
    lines = _ours(caplog)
    assert len(lines) == 2 and all(f"trial {trial.number} was already finished" in line for line in lines)
    with pytest.raises(ValueError, match="values"), lost_race(trial.number):
        raise ValueError("other values problem")  # anything else still raises


@pytest.mark.parametrize(
    "env, message",
    [({"AUTOPRUNE_HEARTBEAT_S": "soon"}, "must be a number"),
     ({"AUTOPRUNE_HEARTBEAT_S": "-1"}, "must be positive"),
     ({"AUTOPRUNE_HEARTBEAT_S": "5", "AUTOPRUNE_HEARTBEAT_GRACE_S": "5"}, "must exceed")],
)
def test_bad_heartbeat_settings_are_one_line(env, message, monkeypatch, capsys, tiny_llama_dir, data_dir, tmp_path):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AutopruneError, match=message):
        heartbeat_settings()
    code = main(["search", "--model", str(tiny_llama_dir), "--data", str(data_dir),
                 "--storage", str(tmp_path / "s.db"), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "s.db").exists() or optuna.get_all_study_names(f"sqlite:///{tmp_path / 's.db'}") == []
