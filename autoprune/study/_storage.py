"""Opening Optuna storages by URL without ever showing a password.

A storage is named by one string: a plain path or ``sqlite:///file.db`` (a SQLite file), any
SQLAlchemy URL Optuna's RDB storage takes (``postgresql://user@host/db``, ``mysql://...``), or
``journal://PATH`` (everything after ``journal://`` is the path of an Optuna journal file, so
``journal:///abs/x.log`` is absolute). For a URL without a password, one may come from
``AUTOPRUNE_STORAGE_PASSWORD`` or from the file ``AUTOPRUNE_STORAGE_PASSWORD_FILE`` names, so it
never sits in a config file, a shell history or a Ray job's command line. Every message that names
a storage goes through :func:`mask_url`, and nothing autoprune stores (study attributes, recipes)
holds the URL at all.

Queries (``front``, ``export``) open with ``create=False``: a file that does not exist is an error,
never a new empty storage, so a typo cannot leave debris or touch a study.

A search writes a SQLite file dozens of times per trial (Optuna commits every suggested parameter
and every user attribute on its own), and in SQLite's default rollback-journal mode every commit
waits for the disk twice. While a search runs, its file is therefore in write-ahead-log mode with
``synchronous=NORMAL``: a commit is an append, and what a commit wrote survives the process being
killed (only a power cut can drop the last commits, never corrupt the file). A search that ends
puts the file back in rollback-journal mode, so a finished study is one self-contained file that
any SQLite reader opens, even from a read-only folder; a killed one leaves ``FILE-wal`` beside it,
which the next search or query folds back in. Queries leave a file's mode as they find it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from autoprune.errors import AutopruneError

DEFAULT_STORAGE = "sqlite:///autoprune.db"
PASSWORD_ENV = "AUTOPRUNE_STORAGE_PASSWORD"
PASSWORD_FILE_ENV = "AUTOPRUNE_STORAGE_PASSWORD_FILE"
JOURNAL_PREFIX = "journal://"
#: The suffix of a study's lease companion (see :mod:`autoprune.study._liveness`), left out of listings.
LEASE_SUFFIX = ":driver-lease"
_CONNECT_TIMEOUT_S = 10

_USERINFO_PASSWORD = re.compile(r"^(?P<head>[^:/?#]+://[^:/@?#]*):(?P<password>.*)@(?P<tail>[^@]*)$")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``."""
    masked = _USERINFO_PASSWORD.sub(r"\g<head>:***@\g<tail>", url)
    return _QUERY_PASSWORD.sub(r"\1***", masked)


def storage_url(url: str) -> str:
    """The full URL for ``url``: a plain path names a SQLite file."""
    return url if "://" in url else f"sqlite:///{url}"


def storage_file(url: str) -> Path | None:
    """The file the storage ``url`` keeps its studies in (a SQLite database or an Optuna journal);
    None for a database server or an in-memory SQLite database."""
    url = storage_url(url)
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX) :])
    parsed = _parsed(url)
    if parsed.get_backend_name() != "sqlite" or not _names_a_file(parsed):
        return None
    return Path(parsed.database)


def open_storage(url: str, create: bool = False) -> BaseStorage:
    """The Optuna storage behind ``url``; with ``create`` a missing SQLite/journal file (and its
    folder) is created, without it a missing file is an :class:`AutopruneError`."""
    url = storage_url(url)
    shown = mask_url(url)
    file = storage_file(url)
    if file is not None:
        _check_file(file, create, shown)
    if url.startswith(JOURNAL_PREFIX):
        try:
            return JournalStorage(JournalFileBackend(str(file)))
        except Exception as error:  # a folder, a permission, a corrupt log: all the user's to fix
            raise _cannot_open(shown, error, None) from None
    parsed = _parsed(url)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() != "sqlite":
        if parsed.password is None:
            parsed = parsed.set(password=_given_password())
        if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
            # SQLAlchemy 2.1 means psycopg 3 by a bare postgresql://; use psycopg2 where it is the
            # driver installed (autoprune's ``postgres`` extra).
            parsed = parsed.set(drivername="postgresql+psycopg2")
        url = parsed.render_as_string(hide_password=False)
        engine_kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT_S}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as error:  # drivers raise their own types; all mean "cannot open"
        secret = str(parsed.password) if parsed.password is not None else None
        raise _cannot_open(shown, error, secret) from None


@contextmanager
def opened_storage(url: str, create: bool = False) -> Iterator[BaseStorage]:
    """:func:`open_storage` whose connections are closed on leaving; a SQLite file a search
    opened (``create``) is first put back in rollback-journal mode if :func:`write_ahead` (or a
    killed search) left it in WAL mode."""
    storage = open_storage(url, create)
    try:
        yield storage
    finally:
        if create and _is_sqlite_file(storage):
            _leave_write_ahead(storage)
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()


def write_ahead(storage: BaseStorage) -> None:
    """Put ``storage``, if a SQLite file, in WAL mode with ``synchronous=NORMAL`` for every
    connection from now on (a no-op for other storages). A search calls it once its checks have
    passed, so a refused run leaves the file's bytes as they were."""
    if not _is_sqlite_file(storage):
        return

    def configure(connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", configure)
    storage.engine.dispose()  # the connections opened so far are in the old mode
    with storage.engine.connect():  # the file is in WAL mode from here, not from Optuna's next write
        pass


def _leave_write_ahead(storage: RDBStorage) -> None:
    """Fold a write-ahead log back into the file and return it to rollback-journal mode (nothing
    is written for a file already in that mode)."""
    storage.engine.dispose()  # SQLite leaves WAL mode only from the file's one open connection
    try:
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=DELETE")
    except SQLAlchemyError:
        pass  # another connection has the file open: it stays in WAL mode, which every reader reads


def _parsed(url: str) -> URL:
    """The SQLAlchemy URL ``url``; a one-line error naming it (masked) if it is none."""
    try:
        return make_url(url)
    except ArgumentError:
        raise AutopruneError(f"invalid storage URL {mask_url(url)}") from None


def _is_sqlite_file(storage: BaseStorage) -> bool:
    return (
        isinstance(storage, RDBStorage)
        and storage.engine.dialect.name == "sqlite"
        and _names_a_file(storage.engine.url)
    )


def _names_a_file(url: URL) -> bool:
    """Whether a SQLite URL names a database file (not an in-memory database)."""
    return url.database not in (None, "", ":memory:")


def load_existing_study(url: str, name: str) -> optuna.Study:
    """A study that must already exist: queries never create one."""
    storage = open_storage(url, create=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(
            summary.study_name
            for summary in optuna.get_all_study_summaries(storage)
            if not summary.study_name.endswith(LEASE_SUFFIX)
        )
        known = f" (studies there: {', '.join(names)})" if names else " (it holds no studies)"
        raise AutopruneError(f"study {name!r} not found in {mask_url(storage_url(url))}{known}") from None


def running_trial(study: optuna.Study, storage: BaseStorage, number: int) -> optuna.Trial:
    """The running trial ``number`` of ``study`` (kept in ``storage``), to write and tell as if this
    process had asked it (a killed driver's orphan, say). Optuna has no public lookup from a stored
    trial to its :class:`optuna.Trial`; its id comes from the storage's public interface."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def stored_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters of a stored trial, also of an enqueued one whose run was killed before all
    its parameters were written: Optuna keeps an enqueued trial's under the system attribute
    ``fixed_params`` (undocumented; ``tests/test_library_contracts.py`` checks it)."""
    return trial.system_attrs.get("fixed_params") or trial.params


def _given_password() -> str | None:
    """The password from ``AUTOPRUNE_STORAGE_PASSWORD``, else the content of the file
    ``AUTOPRUNE_STORAGE_PASSWORD_FILE`` names (a final newline dropped), else None."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        password = Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise AutopruneError(f"{PASSWORD_FILE_ENV}: cannot read {path}: {reason}") from None
    if not password:
        raise AutopruneError(f"{PASSWORD_FILE_ENV}: {path} is empty")
    return password


def _check_file(path: Path, create: bool, shown: str) -> None:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise AutopruneError(f"storage {shown} not found: {path} does not exist")


def _cannot_open(shown: str, error: Exception, secret: str | None) -> AutopruneError:
    lines = str(error).strip().splitlines()
    reason = " ".join(lines[0].split()) if lines else type(error).__name__
    if isinstance(error, ImportError) and error.__cause__ is not None:
        reason = f"{reason} ({error.__cause__})"
    if secret:
        reason = reason.replace(secret, "***")
    return AutopruneError(f"cannot open storage {shown}: {mask_url(reason)[:240]}")
