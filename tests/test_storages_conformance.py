"""Every storage passes the same contract (as every method and every space passes theirs): a study
created there is found again, with its trials and attributes, by a fresh connection; a query never
creates a study (nor a file); a search stores its settings, resumes with the same ones and refuses
changed ones before writing anything. A SQLite URL, a plain path, a journal file, and PostgreSQL
(``postgres`` marker: the database ``AUTOPRUNE_TEST_POSTGRES`` names, see ``postgres_url``)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from conftest import tiny_config
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.study import (
    PASSWORD_ENV,
    load_existing_study,
    opened_storage,
    run_search,
    study_settings,
)

STORAGES = [
    pytest.param("sqlite"),
    pytest.param("path"),
    pytest.param("journal"),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The storage's URL; nothing exists there yet (a PostgreSQL database holds other studies)."""
    if request.param == "postgres":
        url, password = request.getfixturevalue("postgres_url")
        if password:
            monkeypatch.setenv(PASSWORD_ENV, password)
        return url
    folder = tmp_path / "storage"
    return {
        "sqlite": f"sqlite:///{folder / 'study.db'}",
        "path": str(folder / "study.db"),
        "journal": f"journal://{folder / 'study.log'}",
    }[request.param]


@pytest.fixture
def name() -> str:
    """A study name no earlier run left in a shared database."""
    return f"conformance-{time.time_ns()}"


def test_a_study_is_found_again_with_its_trials_and_attributes(storage, name):
    with opened_storage(storage, create=True) as opened:
        study = optuna.create_study(storage=opened, study_name=name, directions=["minimize"] * 2)
        study.set_user_attr("settings", {"space": "uniform", "range": [0.3, 0.7]})
        trial = study.ask({"target": optuna.distributions.FloatDistribution(0.3, 0.7)})
        trial.set_user_attr("plan", {"layers": {"a": 0.5}})
        study.tell(trial, [1234, 5.5])
        study.tell(study.ask(), state=TrialState.FAIL)
        study.enqueue_trial({"target": 0.4})
    found = load_existing_study(storage, name)
    assert found.user_attrs["settings"] == {"space": "uniform", "range": [0.3, 0.7]}
    trials = found.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[0].values == [1234, 5.5] and trials[0].params == {"target": trial.params["target"]}
    assert trials[0].user_attrs == {"plan": {"layers": {"a": 0.5}}}
    assert trials[2].system_attrs["fixed_params"] == {"target": 0.4}
    with pytest.raises(AutopruneError, match=f"study 'other-{name}' not found"):
        load_existing_study(storage, f"other-{name}")


def test_a_query_creates_nothing(storage, name, tmp_path):
    with pytest.raises(AutopruneError, match="not found"):
        load_existing_study(storage, name)
    assert not (tmp_path / "storage").exists()  # no file, no folder
    with opened_storage(storage, create=True) as opened:
        assert name not in optuna.get_all_study_names(opened)


def test_a_search_stores_its_settings_resumes_and_refuses_changes(
    storage, name, tiny_llama_dir, data_dir, tmp_path
):
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, storage=storage, study=name,
                         space="uniform", trials=3, eval_windows=2)
    first = run_search(config, progress=False)
    study = load_existing_study(storage, name)
    assert first.finished == 3 and not first.resumed and len(study.trials) == 3
    assert study_settings(study) == config.settings()
    before = {t.number: (t.state, t.values, t.params, t.user_attrs) for t in study.trials}

    again = run_search(config.model_copy(update={"trials": 4}), progress=False)
    study = load_existing_study(storage, name)
    assert again.resumed and again.finished == 4 and len(study.trials) == 4
    assert {t.number: (t.state, t.values, t.params, t.user_attrs) for t in study.trials[:3]} == before
    assert study_settings(study) == config.settings()

    with pytest.raises(AutopruneError, match="eval_windows"):
        run_search(config.model_copy(update={"eval_windows": 3, "trials": 6}), progress=False)
    assert len(load_existing_study(storage, name).trials) == 4
