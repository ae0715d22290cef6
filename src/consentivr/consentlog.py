"""One consent-log interface, two backends: SQLite (one node) and PostgreSQL (many).

:class:`ConsentLogBackend` is what :class:`consentivr.store.GroupCommitter` and the
CLI need of a log. :func:`open_consent_log` picks the backend from ``database:`` (a
path, or ``postgresql://user@host:port/dbname``). The readers and the rights
commands take a connection shaped like ``sqlite3.Connection`` from
:func:`open_reader` (and :func:`consentivr.purgelog.open_log_for`): the SQLite
file, or a PostgreSQL session through :class:`consentivr.pgstore.CompatConnection`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from consentivr.errors import StoreError
from consentivr.messages import DecisionRecord

if TYPE_CHECKING:
    from consentivr.settings import Settings
    from consentivr.store import CallerKey


class ConsentLogBackend(Protocol):
    """A consent log: chained appends, marks, reads; one instance per thread."""

    path: Any  # what messages name: the file, or the URL without a password
    caller_key: CallerKey

    @property
    def in_transaction(self) -> bool: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def savepoint(self) -> contextlib.AbstractContextManager[None]: ...
    def append_many(self, records: list[DecisionRecord]) -> None: ...
    def append(self, record: DecisionRecord) -> None: ...
    def mark_recording(self, call_id: str, confirmed: bool, error: str | None,
                       at: float) -> None: ...
    def void_late_consent(self, call_id: str, reason: str, at: float) -> None: ...
    def recording_started(self, uniqueid: str, at: float) -> None: ...
    def recording_stopped(self, uniqueid: str, at: float) -> None: ...
    def calls(self, limit: int | None = None,
              newest_first: bool = True) -> Iterator[dict[str, Any]]: ...
    def calls_of(self, number: str, limit: int | None = None) -> list[dict[str, Any]]: ...
    def call(self, call_id: str) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


def is_shared(settings: Settings) -> bool:
    return settings.database_url is not None


def caller_key_for(settings: Settings) -> CallerKey:
    from consentivr.store import CallerKey, load_or_create_key

    if settings.database_url is not None:
        # configfile.py insists on a configured key for a shared log: no key file per node.
        assert settings.caller_key is not None
        return CallerKey(settings.caller_key, settings.callers.default_region)
    return load_or_create_key(settings.database, settings.caller_key,
                              settings.callers.default_region)


def open_consent_log(settings: Settings, key: CallerKey | None = None,
                     check: bool = True) -> ConsentLogBackend:
    """The configured log, opened (and, for an empty PostgreSQL database, created)."""
    key = key or caller_key_for(settings)
    if settings.database_url is not None:
        from consentivr.pgstore import PostgresConsentLog

        return PostgresConsentLog(settings.database_url, key, settings.node,
                                  settings.database_password, check=check)
    from consentivr.store import ConsentLog

    return ConsentLog(settings.database, key)


def open_reader(settings: Settings, reconnect: bool = True, create: bool = False) -> Any:
    """A connection shaped like ``sqlite3.Connection`` (``?`` placeholders, rows by
    name or index) on either backend; the caller closes it. On PostgreSQL the schema
    version is checked first (``create``: an empty database gets the schema)."""
    if settings.database_url is not None:
        from consentivr.pgstore import CompatConnection, check_schema, connect, safe_url

        url, password = settings.database_url, settings.database_password
        session = connect(url, password)
        try:
            check_schema(session, safe_url(url), create=create)
        except BaseException:
            session.close()
            raise
        return CompatConnection(session, safe_url(url),
                                (lambda: connect(url, password)) if reconnect else None)
    import sqlite3

    path = settings.database
    if not path.exists():
        raise StoreError(f"{path}: no consent log here")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT 1 FROM calls LIMIT 1")
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot read the consent log: {exc}") from exc
    return conn
