"""Storages by URL: SQLite paths, journal files and PostgreSQL (a throw-away server started here,
or the one CI names in ``AUTOPRUNE_TEST_POSTGRES``), passwords from the environment, and no
password ever in a message or in what a study stores."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import URL, make_url

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

PASSWORD = "s3cret-Pa55"


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on the PATH, else in Debian's versioned folder (newest)."""
    versioned = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    found = shutil.which(name) or (str(versioned[-1]) if versioned else None)
    if found is None:
        pytest.fail(f"no PostgreSQL {name}: install the server, or export the DSN `bash .ci/postgres.sh` "
                    "prints as AUTOPRUNE_TEST_POSTGRES")
    return found


@pytest.fixture(scope="module")
def postgres_url():
    """A URL without password of a PostgreSQL database that wants ``PASSWORD``: CI's (the DSN in
    ``AUTOPRUNE_TEST_POSTGRES``), else a throw-away server started here. Never a skip: these tests
    are the only proof the storage works on a real server."""
    given = os.environ.get("AUTOPRUNE_TEST_POSTGRES")
    if given:
        url = make_url(given)  # URL.set(password=None) keeps the password: build one without
        bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
        yield bare.render_as_string(), url.password
        return
    folder = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    (folder / "pw").write_text(PASSWORD)
    port = _free_port()
    subprocess.run(
        [*as_user, _postgres_bin("initdb"), "-D", str(folder / "data"), "-U", "autoprune", "--auth=scram-sha-256",
         f"--pwfile={folder / 'pw'}", "--no-sync"], check=True, capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = _postgres_bin("pg_ctl")
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql://autoprune@127.0.0.1:{port}/postgres", PASSWORD
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


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
        calib_samples=8, cache_dir=str(tmp_path / "cache"),
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
