"""SIGKILL ``autoprune search`` mid-trial, run the same command again: finished trials are kept,
the interrupted ones are marked failed (orphaned) and retried, nothing complete is duplicated, and
the study ends with exactly the trials asked for."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from conftest import GRACE_S, HEARTBEAT, STATES_QUERY, TRIALS_ONLY_FLAGS, assert_resumed, kill_mid_trial

TRIALS = 10


def search_command(model_dir, data_dir, db) -> list[str]:
    return [
        sys.executable, "-m", "autoprune", "search", "--model", str(model_dir), "--data",
        str(data_dir), "--storage", f"sqlite:///{db}", "--study", "resume", "--trials", str(TRIALS),
        "--seeded", "false", "--space", "layerwise", "--method", "sparsegpt", "--population", "4", "--sparsity-range",
        "0.3", "0.7", "--eval-windows", "4", "--min-windows", "1", "--seq-len", "32",
        "--calib-samples", "8", "--threads", "1", "--format", "json", *TRIALS_ONLY_FLAGS,
    ]


def trial_states(db) -> list[str] | None:
    """States by trial number, or None while the database is mid-write."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as connection:
            return [str(row[0]) for row in connection.execute(STATES_QUERY, {"study": "resume"})]
    except sqlite3.Error:
        return None


@pytest.mark.slow
def test_sigkill_then_rerun_continues_the_study(tiny_llama_dir, data_dir, tmp_path):
    db = tmp_path / "study.db"
    env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", **HEARTBEAT}
    command = search_command(tiny_llama_dir, data_dir, db)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_mid_trial(process, lambda: trial_states(db))
    time.sleep(GRACE_S)  # the killed driver's heartbeat goes stale (test_search_two_drivers: not before)

    storage = f"sqlite:///{db}"
    before = optuna.load_study(study_name="resume", storage=storage).trials
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "re-queued" in rerun.stderr
    assert json.loads(rerun.stdout)  # the front
    assert_resumed(before, optuna.load_study(study_name="resume", storage=storage).trials, TRIALS)
