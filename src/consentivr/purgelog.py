"""The purge log (``purge_runs``, ``purge_items``) and the lock that keeps runs apart.

One purge or erasure runs at a time: a lock file next to a SQLite log, or on a
shared PostgreSQL log an advisory lock held by the run's session (so across nodes).
A held lock also proves that no earlier run is still alive, which is what lets the
next run settle an interrupted one's pending items.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from consentivr.consentlog import open_reader
from consentivr.errors import ConsentivrError, StoreError
from consentivr.logschema import PURGE_RUNS, create_table
from consentivr.paths import make_private_dir
from consentivr.store import open_database

# The purge log. Items hold row numbers (seq) and, for orphans, the file's path
# under the recordings dir (a call id file name): nothing personal.
PURGE_SCHEMA = create_table("purge_runs", PURGE_RUNS, "sqlite") + """;
CREATE TABLE IF NOT EXISTS purge_items (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES purge_runs(id),
    seq INTEGER,                     -- calls.seq; NULL for an orphan file
    action TEXT NOT NULL,            -- recording_deleted | recording_missing | redacted |
                                     -- caller_cleared | orphan_deleted | erased
    state TEXT NOT NULL,             -- pending | done
    path TEXT,                       -- orphans only: the path under the recordings dir
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS purge_items_run ON purge_items(run_id);
CREATE INDEX IF NOT EXISTS purge_items_pending ON purge_items(state) WHERE state = 'pending';
-- Lets the purge find expired callback numbers without scanning the whole log.
CREATE INDEX IF NOT EXISTS calls_callback_until ON calls(callback_until)
    WHERE caller_number IS NOT NULL;
"""


class PurgeBusy(ConsentivrError):
    """Another purge or erasure holds the lock."""


def open_log(path: Path) -> sqlite3.Connection:
    """The consent log with the purge log's tables."""
    conn = open_database(path)
    try:
        conn.executescript(PURGE_SCHEMA)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"{path}: cannot create the purge log: {exc}") from exc
    return conn


def open_log_for(settings: Any) -> Any:
    """A read-write connection for the rights commands (purge, subject, callbacks),
    shaped like ``sqlite3.Connection``: :func:`open_log` on the
    SQLite file, a session on a shared PostgreSQL log."""
    if settings.database_url is not None:
        return open_reader(settings, create=True)
    return open_log(settings.database)


@contextlib.contextmanager
def purge_lock(db_path: Path, wait: float = 0.0) -> Iterator[None]:
    """One purge or erasure at a time; a held lock also proves no run is alive."""
    lock_path = db_path.with_name(db_path.name + ".purge.lock")
    try:
        make_private_dir(lock_path.parent)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StoreError(f"{lock_path}: cannot open the purge lock: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PurgeBusy(
                        f"{lock_path}: another purge or erasure is running"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)



def local_lock(settings: Any, database: Path,
               wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
    """The lock file next to a SQLite log; a shared log's lock is in the server."""
    if settings is None or settings.database_url is None:
        return purge_lock(database, wait)
    return contextlib.nullcontext()


@contextlib.contextmanager
def shared_log(settings: Any, database: Path,
               wait: float = 0.0) -> Iterator[tuple[Any, str | None, Callable[[], Any] | None]]:
    """(connection, node, reader factory) for a purge or erasure: the SQLite file, or
    on a shared PostgreSQL log a session holding the log's purge lock, so that one
    run at a time redacts rows, whichever node it runs on."""
    if settings is None or settings.database_url is None:
        conn = open_log(database)
        try:
            yield conn, None, None
        finally:
            conn.close()
        return
    from consentivr.pgstore import REDACTION_LOCK

    # No reconnect: a new session would not hold the lock.
    conn = open_reader(settings, reconnect=False, create=True)
    try:
        deadline = time.monotonic() + wait
        while not conn.execute("SELECT pg_try_advisory_lock(?)",
                               (REDACTION_LOCK,)).fetchone()[0]:
            if time.monotonic() >= deadline:
                raise PurgeBusy(f"{conn.where}: another purge or erasure is running "
                                "(on some node)")
            time.sleep(0.1)
        yield conn, settings.node, lambda: open_reader(settings)
    finally:
        conn.close()  # ends the session: the lock goes with it


def purge_runs(conn: sqlite3.Connection, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs of the purge log, newest first."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM purge_runs ORDER BY id DESC LIMIT ?", (limit,))]
