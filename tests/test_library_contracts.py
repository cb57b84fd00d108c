"""What autoprune relies on from its libraries beyond their documented surface, each behind one
function: these tests fail loudly when a new Optuna or Ray changes it.

- :func:`autoprune.study._storage.running_trial`: a stored running trial (a killed driver's) is
  written and told through :class:`optuna.Trial` built from the storage's public id lookup;
- :func:`autoprune.study._storage.stored_params`: an enqueued trial's parameters are kept under
  Optuna's system attribute ``fixed_params`` before they are written one by one;
- :func:`autoprune.study._ray.recorded_entrypoint`: Ray records the driver's command line it gets
  from a private function; a storage password in it must reach Ray's job table masked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.study import open_storage
from autoprune.study._storage import running_trial, stored_params


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_stored_running_trial_is_written_and_told_from_another_study_object(kind, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else f"journal://{tmp_path / 's.log'}"
    storage = open_storage(url, create=True)
    first = optuna.create_study(storage=storage, study_name="s", directions=["minimize", "minimize"])
    first.ask()
    asked = first.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    first.tell(0, [1.0, 2.0])
    # A new driver: its own study object over the same storage, the trial still RUNNING.
    later = optuna.load_study(study_name="s", storage=open_storage(url))
    trial = running_trial(later, storage, asked.number)
    assert trial.number == asked.number and trial.params == asked.params
    trial.set_user_attr("reason", "orphaned")
    later.tell(trial, state=TrialState.FAIL)
    stored = optuna.load_study(study_name="s", storage=open_storage(url)).trials
    assert [t.state for t in stored] == [TrialState.COMPLETE, TrialState.FAIL]
    assert stored[1].user_attrs == {"reason": "orphaned"} and stored[0].user_attrs == {}
    with pytest.raises(KeyError):  # a trial the study does not hold is an error, not another trial
        running_trial(later, storage, 7)



def test_an_enqueued_trial_asked_but_not_yet_written_keeps_its_parameters(tmp_path):
    storage = open_storage(str(tmp_path / "s.db"), create=True)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.25, "kind": "b"})
    study.ask()  # running, no parameter suggested yet: a driver killed here leaves it so
    study.ask().suggest_float("y", 0, 1)  # a sampled trial: only what was written
    first, second = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "s.db"))).trials
    assert first.params == {} and stored_params(first) == {"x": 0.25, "kind": "b"}
    assert stored_params(second) == second.params and list(second.params) == ["y"]


def test_ray_records_the_masked_entrypoint_and_only_inside_the_helper(monkeypatch):
    ray = pytest.importorskip("ray")
    import ray._private.state
    import ray._private.utils

    from autoprune.study._ray import recorded_entrypoint

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    original = ray._private.utils.get_entrypoint_name
    masked = "autoprune search --storage postgresql://user:***@host/db"
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # socket paths are length-limited
    try:
        with recorded_entrypoint(masked):
            ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=str(folder))
        assert ray._private.utils.get_entrypoint_name is original
        jobs = ray._private.state.jobs()
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    entrypoints = [job.get("Entrypoint") for job in jobs]
    assert entrypoints == [masked], json.dumps(jobs, default=str)[:2000]
