"""Cache entries that are whole or absent: atomic writes, a manifest written last, checks on read.

A cache entry (a folder of calibration statistics, a file of self-generated text) can be damaged
after it was written (a disk filled up, a copy was interrupted, a sync tool truncated a file) or
seen while another process is still writing it. Every entry is therefore

- written out of sight and renamed into place (a folder: staged in a ``.partial-*`` sibling; a
  file: a ``.partial-*`` temporary), so a reader never sees half of one;
- committed by a manifest written last (a folder: ``manifest.json`` with each file's size and
  sha256; a file: its payload's sha256 in its own metadata), so an entry whose manifest is missing
  was never finished;
- checked on read against that manifest; a damaged entry is reported by :func:`warn_damaged` (one
  line) and its caller recomputes it and replaces it with :func:`replace_folder`.

Why sha256 and not sizes only: a garbled file keeps its size. Hashing a folder costs one read of
it, which the reader pays once per process (:func:`check_folder` remembers what it verified).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_LOG = logging.getLogger("autoprune.cache")
#: Folders verified by this process, with the manifest's (inode, mtime) they were verified at.
_verified: dict[Path, tuple[int, int]] = {}


def sha256_of(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Commit ``folder``: write its manifest (size and sha256 of every other file in it), last."""
    files = {
        path.name: {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    write_text_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def folder_problem(folder: Path) -> str | None:
    """What is wrong with the committed folder ``folder`` (None when its manifest checks out): a
    missing or unreadable manifest, a listed file missing, of another size or another sha256."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def check_folder(folder: Path) -> str | None:
    """:func:`folder_problem`, hashed once per process per manifest version."""
    try:
        stamp = (folder / MANIFEST).stat()
        key = (stamp.st_ino, stamp.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and _verified.get(folder) == key:
        return None
    problem = folder_problem(folder)
    if problem is None and key is not None:
        _verified[folder] = key
    return problem


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it."""
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def replace_folder(staging: Path, folder: Path) -> bool:
    """Rename the finished ``staging`` folder to ``folder``, moving a damaged ``folder`` aside
    first. False (``staging`` removed) when another process put a folder there in the meantime:
    the caller reads theirs."""
    if folder.exists():
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".damaged-"))
        try:
            folder.rename(aside / folder.name)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(aside, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def warn_damaged(what: str, path: Path, problem: str) -> None:
    """The one line that says a cache entry is damaged and is being recomputed."""
    _LOG.warning("autoprune: warning: %s %s is damaged (%s); recomputing it", what, path, problem)
