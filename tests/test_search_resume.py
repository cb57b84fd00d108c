"""SIGKILL ``autoprune search`` mid-trial, run the same command again: finished trials are kept,
the interrupted ones are marked failed (orphaned) and retried, nothing complete is duplicated, and
the study ends with exactly the trials asked for."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.study import counts_toward_budget

TRIALS = 10
#: A short heartbeat, so a killed driver's trials are stale (re-queued) after GRACE_S seconds.
GRACE_S = 3.0
HEARTBEAT = {"AUTOPRUNE_HEARTBEAT_S": "0.3", "AUTOPRUNE_HEARTBEAT_GRACE_S": str(GRACE_S)}
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def search_command(model_dir, data_dir, db) -> list[str]:
    return [
        sys.executable, "-m", "autoprune", "search", "--model", str(model_dir), "--data",
        str(data_dir), "--storage", f"sqlite:///{db}", "--study", "resume", "--trials", str(TRIALS),
        "--seeded", "false", "--space", "layerwise", "--method", "sparsegpt", "--population", "4", "--sparsity-range",
        "0.3", "0.7", "--eval-windows", "4", "--min-windows", "1", "--seq-len", "32",
        "--calib-samples", "8", "--threads", "1", "--format", "json",
    ]


#: The states of study ``:study`` in an Optuna RDB (RUNNING only once its parameters are written),
#: by trial number.
STATES_QUERY = (
    "SELECT CASE WHEN t.state = 'RUNNING' AND NOT EXISTS "
    "(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id) "
    "THEN 'ASKING' ELSE CAST(t.state AS TEXT) END "
    "FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :study "
    "ORDER BY t.number"
)


def trial_states(db) -> list[str] | None:
    """States by trial number, or None while the database is mid-write."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as connection:
            return [str(row[0]) for row in connection.execute(STATES_QUERY, {"study": "resume"})]
    except sqlite3.Error:
        return None


def kill_mid_trial(
    process: subprocess.Popen, states: Callable[[], list[str] | None], deadline_s: float = 120
) -> None:
    """SIGKILL once >= 2 trials finished while another one runs."""
    stop_mid_trial(process, states, deadline_s)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def stop_mid_trial(
    process: subprocess.Popen, states: Callable[[], list[str] | None], deadline_s: float = 120
) -> None:
    """SIGSTOP once >= 2 trials finished while another one runs: stop the process first so the
    check and the stop see the same state."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        if ready(states()):
            os.kill(process.pid, signal.SIGSTOP)
            if ready(states()):
                return
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the search never had two finished trials and a running one")


def ready(states: list[str] | None) -> bool:
    return bool(states) and sum(s in FINISHED for s in states) >= 2 and "RUNNING" in states


def test_sigkill_then_rerun_continues_the_study(tiny_llama_dir, data_dir, tmp_path):
    db = tmp_path / "study.db"
    env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", **HEARTBEAT}
    command = search_command(tiny_llama_dir, data_dir, db)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_mid_trial(process, lambda: trial_states(db))
    time.sleep(GRACE_S)  # the killed driver's heartbeat goes stale (test_search_liveness: not before)

    storage = f"sqlite:///{db}"
    before = optuna.load_study(study_name="resume", storage=storage).trials
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "re-queued" in rerun.stderr
    assert json.loads(rerun.stdout)  # the front
    assert_resumed(before, optuna.load_study(study_name="resume", storage=storage).trials, TRIALS)


def assert_resumed(before: list[FrozenTrial], after: list[FrozenTrial], trials: int) -> None:
    """``after`` (the study once the rerun finished) kept what ``before`` (right after the kill) had
    finished, failed and retried once each trial the kill interrupted, and holds no duplicate."""
    orphans = {  # what each interrupted trial was to measure (parameters are written one by one)
        t.number: t.system_attrs.get("fixed_params") or t.params
        for t in before
        if t.state == TrialState.RUNNING
    }
    kept = {t.number: (t.state, t.values, t.params) for t in before if t.state.is_finished()}
    assert orphans and len(kept) >= 2
    assert {t.number: (t.state, t.values, t.params) for t in after if t.number in kept} == kept
    for number, params in orphans.items():
        assert after[number].state == TrialState.FAIL
        assert after[number].user_attrs["reason"] == "orphaned"
        retries = [t for t in after if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and params.items() <= retries[0].params.items()
        assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    complete = [json.dumps(t.params, sort_keys=True) for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == len(set(complete))
    assert sum(counts_toward_budget(t) for t in after) == trials
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
