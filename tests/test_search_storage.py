"""Storages by URL: SQLite paths, journal files and PostgreSQL (the ``postgres_url`` fixture: the
database CI names in ``AUTOPRUNE_TEST_POSTGRES``, else a throw-away server started here), passwords
from the environment, and no password ever in a message or in what a study stores."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
from conftest import TRIALS_ONLY

from autoprune.errors import AutopruneError
from autoprune.study import (
    PASSWORD_ENV,
    SearchConfig,
    load_existing_study,
    mask_url,
    open_storage,
    opened_storage,
    run_search,
    write_ahead,
)

@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://me:pw@host:5432/db", "postgresql://me:***@host:5432/db"),
        ("mysql+pymysql://me:p@ss:w/rd@host/db", "mysql+pymysql://me:***@host/db"),
        ("postgresql://host/db?user=me&password=pw&sslmode=require", "postgresql://host/db?user=me&password=***&sslmode=require"),
        ("postgresql://me@host/db", "postgresql://me@host/db"),
        ("sqlite:///runs/a.db", "sqlite:///runs/a.db"),
        ("journal:///tmp/a.log", "journal:///tmp/a.log"),
    ],
)
def test_mask_url_hides_passwords_only(url, masked):
    assert mask_url(url) == masked


def test_queries_never_create_storage(tmp_path):
    for url in (str(tmp_path / "a.db"), f"sqlite:///{tmp_path / 'b.db'}", f"journal://{tmp_path / 'c.log'}"):
        with pytest.raises(AutopruneError, match="not found"):
            open_storage(url)
    assert not list(tmp_path.iterdir())


def test_plain_paths_and_journal_files_hold_studies(tmp_path):
    for url in (str(tmp_path / "runs" / "a.db"), f"journal://{tmp_path / 'runs' / 'b.log'}"):
        study = optuna.create_study(storage=open_storage(url, create=True), study_name="s")
        study.enqueue_trial({"x": 1.0})
        assert load_existing_study(url, "s").trials[0].system_attrs["fixed_params"] == {"x": 1.0}
        with pytest.raises(AutopruneError, match=r"study .other. not found .*\(studies there: s\)"):
            load_existing_study(url, "other")


def test_a_search_writes_ahead_and_leaves_a_plain_file(tmp_path):
    """WAL while a search holds the file (fast commits), an ordinary rollback-journal file with
    every write in it once the search lets go; queries change no file's mode."""
    path = tmp_path / "old.db"
    rollback = optuna.storages.RDBStorage(f"sqlite:///{path}")  # Optuna's own file: rollback mode
    optuna.create_study(storage=rollback, study_name="s").enqueue_trial({"x": 1.0})
    rollback.engine.dispose()
    with opened_storage(str(path)) as query:
        optuna.load_study(study_name="s", storage=query)
    assert _journal_mode(path) == "delete"
    with opened_storage(str(path), create=True) as storage:
        assert _journal_mode(path) == "delete"  # opening writes nothing yet
        write_ahead(storage)
        assert _journal_mode(path) == "wal"
        optuna.load_study(study_name="s", storage=storage).enqueue_trial({"x": 2.0})
    assert _journal_mode(path) == "delete"
    assert not Path(f"{path}-wal").exists()
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    assert [t.system_attrs["fixed_params"]["x"] for t in load_existing_study(str(copy), "s").trials] == [1.0, 2.0]


def _journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_file_that_is_no_database_is_a_clean_error(tmp_path):
    (tmp_path / "x.db").write_text("not a database")
    with pytest.raises(AutopruneError, match="cannot open storage sqlite:///.*x.db: .*not a database"):
        open_storage(str(tmp_path / "x.db"))


@pytest.mark.postgres
def test_postgres_with_the_password_from_the_environment(
    postgres_url, tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    url, password = postgres_url
    study_name = f"pg-{time.time_ns()}"
    if password:
        monkeypatch.setenv(PASSWORD_ENV, password)
    config = SearchConfig(
        model=str(tiny_llama_dir), data=str(data_dir), storage=url, study=study_name, trials=3,
        space="uniform", sparsity_range=(0.3, 0.6), eval_windows=2, min_windows=1, seq_len=32,
        calib_samples=8, cache_dir=str(tmp_path / "cache"), **TRIALS_ONLY,
    )
    summary = run_search(config, progress=False)
    assert summary.finished == 3 and summary.front
    study = load_existing_study(url, study_name)
    stored = json.dumps([study.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study.trials])
    assert "postgresql" not in stored and (not password or password not in stored)
    if password:
        monkeypatch.setenv(PASSWORD_ENV, "wrong-one")
        with pytest.raises(AutopruneError, match="cannot open storage postgresql://autoprune@") as error:
            open_storage(url)
        assert "wrong-one" not in str(error.value)
        with pytest.raises(AutopruneError) as error:
            open_storage(url.replace("autoprune@", f"autoprune:{password}x@"))
        assert password not in str(error.value) and ":***@" in str(error.value)
