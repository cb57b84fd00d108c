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
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from autoprune.errors import AutopruneError

DEFAULT_STORAGE = "sqlite:///autoprune.db"
PASSWORD_ENV = "AUTOPRUNE_STORAGE_PASSWORD"
PASSWORD_FILE_ENV = "AUTOPRUNE_STORAGE_PASSWORD_FILE"
JOURNAL_PREFIX = "journal://"
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


def open_storage(url: str, create: bool = False) -> BaseStorage:
    """The Optuna storage behind ``url``; with ``create`` a missing SQLite/journal file (and its
    folder) is created, without it a missing file is an :class:`AutopruneError`."""
    url = storage_url(url)
    shown = mask_url(url)
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :])
        _check_file(path, create, shown)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as error:  # a folder, a permission, a corrupt log: all the user's to fix
            raise _cannot_open(shown, error, None) from None
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise AutopruneError(f"invalid storage URL {shown}") from None
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            _check_file(Path(parsed.database), create, shown)
    else:
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


def load_existing_study(url: str, name: str) -> optuna.Study:
    """A study that must already exist: queries never create one."""
    storage = open_storage(url, create=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(summary.study_name for summary in optuna.get_all_study_summaries(storage))
        known = f" (studies there: {', '.join(names)})" if names else " (it holds no studies)"
        raise AutopruneError(f"study {name!r} not found in {mask_url(storage_url(url))}{known}") from None


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
