"""Two real ``autoprune search`` processes on one study (SQLite, journal file, PostgreSQL): the
second, started while the first has a trial in flight, refuses in one line naming the first; the
first finishes the study untouched. A driver SIGKILLed mid-trial: a second one refuses while its
heartbeat is fresh, and once it is stale takes over and re-queues its trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from conftest import TRIALS_ONLY_FLAGS, assert_resumed, kill_mid_trial, stop_mid_trial

from autoprune.study import counts_toward_budget
from autoprune.study._storage import PASSWORD_ENV, open_storage

TRIALS = 8


def _command(model_dir, data_dir, url: str, study: str) -> list[str]:
    return [
        sys.executable, "-m", "autoprune", "search", "--model", str(model_dir), "--data", str(data_dir),
        "--storage", url, "--study", study, "--trials", str(TRIALS), "--seeded", "false",
        "--space", "layerwise", "--method", "sparsegpt", "--population", "4",
        "--sparsity-range", "0.3", "0.7", "--eval-windows", "4", "--min-windows", "1", "--seq-len", "32",
        "--calib-samples", "8", "--threads", "1", "--format", "json", *TRIALS_ONLY_FLAGS,
    ]


def _env(tmp_path, grace_s: float, password: str | None = None) -> dict[str, str]:
    env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "AUTOPRUNE_HEARTBEAT_S": "0.3", "AUTOPRUNE_HEARTBEAT_GRACE_S": str(grace_s)}
    if password:
        env[PASSWORD_ENV] = password
    return env


class _States:
    """Trial states of one study, read the way another process sees them ("ASKING": RUNNING with
    no parameters written yet)."""

    def __init__(self, url: str, study: str) -> None:
        self.storage, self.study = open_storage(url, create=True), study

    def __call__(self) -> list[str] | None:
        try:
            trials = optuna.load_study(study_name=self.study, storage=self.storage).get_trials(deepcopy=False)
        except Exception:  # not created yet, or mid-write
            return None
        return ["ASKING" if t.state == TrialState.RUNNING and not t.params else t.state.name for t in trials]

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name=self.study, storage=self.storage).trials


#: ``autoprune`` that has imported everything and waits for a line on stdin before it runs: the
#: second driver starts the moment the test wants it, not after a loaded machine's import time.
_WARM = "import sys; from autoprune.cli import main; sys.stdin.readline(); sys.exit(main(sys.argv[1:]))"


def _warm(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    assert command[1:3] == ["-m", "autoprune"]
    return subprocess.Popen([sys.executable, "-c", _WARM, *command[3:]], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _go(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate("go\n", timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _refusal(result: subprocess.CompletedProcess, pid: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "is driven by another process (" in lines[0] and f" pid {pid}," in lines[0]
    return lines[0]


def _assert_whole(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Exactly the budget finished, nothing left running, no plan measured twice."""
    assert sum(counts_toward_budget(t) for t in trials) == TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    measured = [json.dumps(t.user_attrs["plan"], sort_keys=True) for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(measured) == len(set(measured))


def _second_driver_is_refused(model_dir, data_dir, tmp_path, url, study, password=None):
    env = _env(tmp_path, grace_s=120, password=password)
    command = _command(model_dir, data_dir, url, study)
    states = _States(url, study)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = _warm(command, env)
    try:
        stop_mid_trial(first, states, deadline_s=180)  # paused with a trial in flight: a slow trial, say
        before = [(t.number, t.state) for t in states.trials()]
        _refusal(_go(second), first.pid)
        assert [(t.number, t.state) for t in states.trials()] == before  # nothing touched
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        second.kill()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "Traceback" not in err.decode(), err.decode()[-2000:]
    assert json.loads(out)
    trials = states.trials()
    assert not [t for t in trials if t.user_attrs.get("reason") == "orphaned"]
    _assert_whole(trials)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_second_driver_on_a_live_study_is_refused(kind, tiny_llama_dir, data_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else f"journal://{tmp_path / 's.log'}"
    _second_driver_is_refused(tiny_llama_dir, data_dir, tmp_path, url, "two")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_second_driver_on_a_live_postgres_study_is_refused(
    postgres_url, tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    url, password = postgres_url
    if password:
        monkeypatch.setenv(PASSWORD_ENV, password)  # for the polling here
    _second_driver_is_refused(tiny_llama_dir, data_dir, tmp_path, url, f"two-{time.time_ns()}", password)


@pytest.mark.slow
def test_a_killed_drivers_trials_are_requeued_once_stale_and_not_before(tiny_llama_dir, data_dir, tmp_path):
    grace = 15.0
    url = f"sqlite:///{tmp_path / 's.db'}"
    env = _env(tmp_path, grace_s=grace)
    command = _command(tiny_llama_dir, data_dir, url, "killed")
    states = _States(url, "killed")
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    early = _warm(command, env)
    kill_mid_trial(first, states, deadline_s=180)
    killed_at = time.time()
    before = states.trials()
    _refusal(_go(early), first.pid)  # had it run only after the grace period, it would take over
    assert [(t.number, t.state) for t in states.trials()] == [(t.number, t.state) for t in before]
    time.sleep(max(0.0, killed_at + grace + 1 - time.time()))
    late = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert late.returncode == 0 and "Traceback" not in late.stderr, late.stderr[-2000:]
    assert "re-queued" in late.stderr
    after = states.trials()
    assert_resumed(before, after, TRIALS)
    _assert_whole(after)
