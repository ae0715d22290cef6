"""The consent log on PostgreSQL: one log shared by several PBX nodes.

Same rows, same hash chain, same guarantees as :mod:`consentivr.store` (SQLite):

* **Durable before recording.** Every session runs with ``synchronous_commit=on``:
  COMMIT returns once the server has flushed the WAL (and, with synchronous
  standbys configured, once they have it too). The call path writes only through
  :class:`consentivr.store.GroupCommitter`, which commits a batch of concurrent
  calls in one transaction, and resolves a call's future only after that commit.
* **One hash chain across nodes.** Appends take ``pg_advisory_xact_lock`` on one
  key, read the chain head and insert under it, so the writers of all nodes are
  serialised for the few microseconds of an append and ``seq`` has no gaps and no
  forks. The lock is released by the commit. Each row carries the ``node`` that
  wrote it, and the node is part of its chain hash.
* **Fail closed.** When the server cannot be reached, writes raise
  :class:`~consentivr.errors.StoreError` within ``CONNECT_TIMEOUT`` (a dead TCP
  peer within ``TCP_USER_TIMEOUT_MS``): the call goes on unrecorded, exactly as on a
  locked SQLite file. The next write reconnects (e.g. to the new primary after a
  failover, if the URL names a host list or a virtual IP).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row, tuple_row

from consentivr.errors import StoreError
from consentivr.logschema import CALLS, PURGE_RUNS, create_table
from consentivr.messages import DecisionRecord
from consentivr.schemaversion import Schema, refusal, stamp
from consentivr.store import (
    GENESIS,
    RECORDING_STARTED_SQL,
    RECORDING_STOPPED_SQL,
    CallerKey,
    chain_hash,
    iso,
    personal_digest,
    public_row,
)

URL_SCHEMES = ("postgresql://", "postgres://")
# One advisory-lock key for the chain ("cIVR"), another for log redaction ("rIVR").
CHAIN_LOCK = 0x63495652
REDACTION_LOCK = 0x72495652
CONNECT_TIMEOUT = 3  # seconds: a call waits at most DECISION_TIMEOUT (6 s) in all
TCP_USER_TIMEOUT_MS = 4000  # a server that vanished mid-commit fails the write, not hangs it
STATEMENT_TIMEOUT_MS = 5000

POSTGRES = Schema("postgresql", {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        create_table("calls", CALLS, "postgresql"),
        "CREATE INDEX calls_caller_hash ON calls(caller_hash)",
        "CREATE INDEX calls_caller_number ON calls(caller_number) "
        "WHERE caller_number IS NOT NULL",
        "CREATE INDEX calls_recording_until ON calls(node, recording_until) "
        "WHERE recording_path IS NOT NULL AND recording_purged_at IS NULL",
        "CREATE INDEX calls_decided_at ON calls(decided_at)",
        "CREATE INDEX calls_uniqueid ON calls(uniqueid)",
        create_table("purge_runs", PURGE_RUNS, "postgresql"),
        "CREATE TABLE purge_items (id BIGSERIAL PRIMARY KEY, "
        "run_id BIGINT NOT NULL REFERENCES purge_runs(id), seq BIGINT, action TEXT NOT NULL, "
        "state TEXT NOT NULL, path TEXT, at TEXT NOT NULL)",
        "CREATE INDEX purge_items_run ON purge_items(run_id)",
        "CREATE INDEX purge_items_pending ON purge_items(state) WHERE state = 'pending'",
        "CREATE INDEX calls_callback_until ON calls(callback_until) "
        "WHERE caller_number IS NOT NULL",
        "CREATE TABLE subject_requests (id BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, "
        "at TEXT NOT NULL)",
        # consentivr.callbacks: the survey team's exports and "done" marks.
        "CREATE TABLE callback_done (id BIGSERIAL PRIMARY KEY, call_id TEXT NOT NULL, "
        "marked_call_id TEXT NOT NULL, done_by TEXT NOT NULL, done_at TEXT NOT NULL)",
        "CREATE INDEX callback_done_call ON callback_done(call_id)",
        "CREATE TABLE callback_exports (id BIGSERIAL PRIMARY KEY, exported_at TEXT NOT NULL, "
        "exported_by TEXT NOT NULL, as_of TEXT NOT NULL, entries INTEGER NOT NULL)",
        "CREATE TABLE callback_export_calls (export_id BIGINT NOT NULL "
        "REFERENCES callback_exports(id), call_id TEXT NOT NULL)",
        "CREATE INDEX callback_export_calls_call ON callback_export_calls(call_id)",
    ),
}, "%s")


_IN_TX = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR,
          psycopg.pq.TransactionStatus.ACTIVE)


def is_postgres_url(text: str) -> bool:
    return text.startswith(URL_SCHEMES)


def safe_url(url: str) -> str:
    """The URL for messages: never a password, even one typed into it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def connect(url: str, password: str | None = None) -> psycopg.Connection[dict[str, Any]]:
    """One autocommit session with full durability and bounded waits."""
    try:
        return psycopg.connect(
            url, password=password or None, autocommit=True, row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT, tcp_user_timeout=TCP_USER_TIMEOUT_MS,
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
            application_name="consentivr",
            options=f"-c synchronous_commit=on -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )
    except psycopg.Error as exc:
        raise StoreError(f"{safe_url(url)}: cannot connect to the consent log: "
                         f"{_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def schema_state(conn: psycopg.Connection[Any]) -> int | None:
    """The stored schema version; None for an empty database."""
    found = conn.execute("SELECT to_regclass('meta') AS t").fetchone()
    if found is None or found["t"] is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return 0 if row is None else int(row["value"])
    except ValueError as exc:
        raise StoreError(f"meta.schema_version is not a number: {row['value']!r}") from exc


def upgrade(conn: psycopg.Connection[Any], schema: Schema | None = None) -> list[int]:
    """Bring the database to the current schema in one transaction, under the chain
    lock so that two nodes upgrading at once do not collide."""
    schema = schema or POSTGRES
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        version = schema_state(conn) or 0
        if version > schema.current:
            raise StoreError(str(refusal(schema, "the database", version)))
        for target in range(version + 1, schema.current + 1):
            for statement in schema.steps[target]:
                conn.execute(statement)  # type: ignore[arg-type]  # our own literal SQL
            stamp(schema, conn, target)
            applied.append(target)
    return applied


def check_schema(conn: psycopg.Connection[Any], where: str, create: bool,
                 schema: Schema | None = None) -> None:
    """Refuse a log whose schema is not this consentivr's, in one line. An empty
    database is created at the current version when ``create`` (a writer), else
    refused (a reader has nothing to read)."""
    schema = schema or POSTGRES
    try:
        version = schema_state(conn)
        if version is None:
            if not create:
                raise StoreError(f"{where}: no consent log here (an empty database; "
                                 "`consentivr db upgrade` creates it)")
            upgrade(conn, schema)
            return
    except psycopg.Error as exc:
        raise StoreError(f"{where}: cannot read the schema version: {_one_line(exc)}") \
            from exc
    problem = refusal(schema, where, version)
    if problem is not None:
        raise StoreError(problem)


class PostgresConsentLog:
    """The consent log on PostgreSQL: the same methods as :class:`store.ConsentLog`.

    Used from one thread (the committer's, or a CLI command's). A broken session is
    replaced on the next transaction.
    """

    def __init__(self, url: str, caller_key: CallerKey, node: str,
                 password: str | None = None, schema: Schema | None = None,
                 check: bool = True) -> None:
        self.url = url
        self.path = safe_url(url)  # what messages name, as store.ConsentLog.path
        self.caller_key = caller_key
        self.node = node
        self._password = password
        self.schema = schema or POSTGRES
        self.conn = connect(url, password)
        if check:
            self._check_schema()

    def _check_schema(self) -> None:
        check_schema(self.conn, self.path, create=True, schema=self.schema)

    def close(self) -> None:
        self.conn.close()

    def _session(self) -> psycopg.Connection[dict[str, Any]]:
        if self.conn.closed or self.conn.broken:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = connect(self.url, self._password)
        return self.conn

    @property
    def in_transaction(self) -> bool:
        # A lost session is UNKNOWN, not in a transaction: the next one reconnects.
        return not self.conn.closed and self.conn.info.transaction_status in _IN_TX

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; COMMIT returns when the server has it on disk. Writes made
        inside join it (as in store.ConsentLog)."""
        if self.in_transaction:
            yield
            return
        conn = self._session()
        try:
            with conn.transaction():
                yield
        except psycopg.Error as exc:
            raise self._error("cannot write the consent log", exc) from exc

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        try:
            with self.conn.transaction():
                yield
        except psycopg.Error as exc:
            raise self._error("cannot write the consent log", exc) from exc

    def _error(self, what: str, exc: psycopg.Error) -> StoreError:
        if isinstance(exc, pg_errors.UniqueViolation):
            # The wording the late-write log recognises as "it did land after all".
            return StoreError(f"{self.path}: {what}: UNIQUE constraint failed: "
                              f"{_one_line(exc)}")
        return StoreError(f"{self.path}: {what}: {_one_line(exc)}")

    # -- writing ----------------------------------------------------------

    def append_many(self, records: list[DecisionRecord]) -> None:
        """Append these rows to the one chain, under the chain lock, in one transaction."""
        from consentivr.store import ConsentLog

        with self.transaction():
            try:
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
                last = self.conn.execute(
                    "SELECT seq, row_hash FROM calls ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last["seq"], last["row_hash"]) if last else (0, GENESIS)
                rows = []
                for rec in records:
                    seq += 1
                    row = ConsentLog._row(self, rec)  # type: ignore[arg-type]  # same mapping
                    row["seq"] = seq
                    row["node"] = self.node
                    salt = secrets.token_hex(16)
                    digest = personal_digest(row, salt)
                    row.update(personal_salt=salt, personal_digest=digest, prev_hash=prev,
                               row_hash=chain_hash(prev, row, digest))
                    prev = row["row_hash"]
                    rows.append(row)
                cols = list(rows[0]) if rows else []
                if rows:
                    sql = (f"INSERT INTO calls ({','.join(cols)}) "
                           f"VALUES ({','.join(['%s'] * len(cols))})")
                    with self.conn.cursor() as cur:
                        cur.executemany(sql, [[r[c] for c in cols] for r in rows])
            except psycopg.Error as exc:
                raise self._error("cannot write the consent log", exc) from exc

    def append(self, record: DecisionRecord) -> None:
        self.append_many([record])

    def mark_recording(self, call_id: str, confirmed: bool, error: str | None,
                       at: float) -> None:
        self._update(
            "UPDATE calls SET recording_confirmed=%s, recording_error=%s, "
            "recording_started_at=%s WHERE call_id=%s",
            (int(confirmed), error, iso(at) if confirmed else None, call_id),
        )

    def void_late_consent(self, call_id: str, reason: str, at: float) -> None:
        self._update(
            "UPDATE calls SET caller_number=NULL, "
            "personal_salt=CASE WHEN caller_number IS NULL THEN personal_salt ELSE NULL END, "
            "recording_confirmed=0, recording_error=%s, "
            "withdrawn_at=COALESCE(withdrawn_at, %s), withdrawn_by=COALESCE(withdrawn_by, %s) "
            "WHERE call_id=%s",
            (reason, iso(at), "system", call_id),
        )

    def recording_started(self, uniqueid: str, at: float) -> None:
        self._update(translate(RECORDING_STARTED_SQL), (iso(at), uniqueid))

    def recording_stopped(self, uniqueid: str, at: float) -> None:
        self._update(translate(RECORDING_STOPPED_SQL), (iso(at), uniqueid))

    def _update(self, sql: str, params: tuple[object, ...]) -> None:
        with self.transaction():
            try:
                self.conn.execute(sql, params)  # type: ignore[arg-type]  # literal SQL
            except psycopg.Error as exc:
                raise self._error("cannot update the consent log", exc) from exc

    # -- reading ----------------------------------------------------------

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[dict[str, Any]]:
        try:
            return self._session().execute(sql, params).fetchall()  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise self._error("cannot read the consent log", exc) from exc

    def calls(self, limit: int | None = None,
              newest_first: bool = True) -> Iterator[dict[str, Any]]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM calls ORDER BY seq {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self._rows(sql):
            yield public_row(row)  # type: ignore[arg-type]

    def calls_of(self, number: str, limit: int | None = None) -> list[dict[str, Any]]:
        from consentivr.callers import spellings

        hashes = self.caller_key.lookup_hashes(number)
        numbers = spellings(number, self.caller_key.region)
        sql = ("SELECT * FROM calls WHERE caller_hash = ANY(%s) OR caller_number = ANY(%s) "
               "ORDER BY seq DESC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [public_row(r) for r in  # type: ignore[arg-type]
                self._rows(sql, (list(hashes), list(numbers)))]

    def call(self, call_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM calls WHERE call_id=%s OR uniqueid=%s "
                          "ORDER BY seq LIMIT 1", (call_id, call_id))
        return public_row(rows[0]) if rows else None  # type: ignore[arg-type]

    def reader(self) -> CompatConnection:
        """This session as the sqlite3-shaped connection the log's readers take."""
        return CompatConnection(self._session(), self.path,
                                lambda: connect(self.url, self._password))


class _Row:
    """A row as ``sqlite3.Row`` is: by name or position, iterating values, ``keys()``
    (so ``dict(row)`` works)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: list[str], values: tuple[Any, ...]) -> None:
        self._names, self._values = names, values

    def keys(self) -> list[str]:
        return self._names

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, int):
            return self._values[key]
        try:
            return self._values[self._names.index(key)]
        except ValueError:
            raise IndexError(f"no such column: {key}") from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+", re.IGNORECASE)


_SQLITE_MASTER = "FROM sqlite_master WHERE type='table' AND name="
_TABLES = "FROM information_schema.tables WHERE table_schema = current_schema() AND table_name="


def translate(sql: str) -> str:
    """The log's SQLite dialect, as the readers write it, in PostgreSQL's: ``?``
    placeholders, no ``INDEXED BY`` hints, ``last_insert_rowid()``, a table probe."""
    sql = _INDEXED_BY.sub("", sql).replace("last_insert_rowid()", "lastval()")
    sql = sql.replace(_SQLITE_MASTER, _TABLES)
    return sql.replace("%", "%%").replace("?", "%s")


class _Cursor:
    """A psycopg cursor with sqlite3's ``lastrowid`` (the serial id just inserted)."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)

    @property
    def lastrowid(self) -> int:
        found = self._cur.connection.cursor(row_factory=tuple_row).execute(
            "SELECT lastval()").fetchone()
        return int(found[0])


def _compat_row(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]

    def make(values: Any) -> _Row:
        return _Row(names, tuple(values))

    return make


class CompatConnection:
    """The part of ``sqlite3.Connection`` the log's readers use (``execute`` with ``?``
    placeholders, rows by name or position), over a PostgreSQL session: lets the
    chain check (:func:`consentivr.audit.verify_chain`) and short readers and writers
    (:class:`consentivr.withdrawal.RecordingLog`) run unchanged on both backends."""

    def __init__(self, conn: psycopg.Connection[Any], where: str,
                 reconnect: Callable[[], psycopg.Connection[Any]] | None = None) -> None:
        self.pg = conn
        self.where = where
        self._reconnect = reconnect
        self._tx: Any = None

    def _session(self) -> psycopg.Connection[Any]:
        """A broken session (the server restarted, or failed over) is replaced
        between transactions."""
        if (self.pg.closed or self.pg.broken) and self._tx is None and self._reconnect:
            with contextlib.suppress(psycopg.Error):
                self.pg.close()
            self.pg = self._reconnect()
        return self.pg

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        if sql.strip().upper() in ("BEGIN", "BEGIN IMMEDIATE"):
            if self.in_transaction:
                return None  # ``with conn:`` already opened the transaction
            sql = "BEGIN"
        cur = self._session().cursor(row_factory=_compat_row)
        try:
            cur.execute(translate(sql), tuple(params))  # type: ignore[arg-type]  # our SQL
        except psycopg.Error as exc:
            raise StoreError(f"{self.where}: {_one_line(exc)}") from exc
        return _Cursor(cur)

    def executemany(self, sql: str, params: Iterable[Sequence[object]]) -> Any:
        cur = self._session().cursor(row_factory=_compat_row)
        try:
            cur.executemany(translate(sql), [tuple(p) for p in params])  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise StoreError(f"{self.where}: {_one_line(exc)}") from exc
        return _Cursor(cur)

    def executescript(self, script: str) -> None:
        """The SQLite modules create their tables on open; here the migrations
        (:data:`POSTGRES`) own every table, so there is nothing to do."""

    @property
    def in_transaction(self) -> bool:
        return not self.pg.closed and self.pg.info.transaction_status in _IN_TX

    def __enter__(self) -> CompatConnection:
        self._tx = self._session().transaction()
        self._tx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        tx, self._tx = self._tx, None
        try:
            tx.__exit__(*exc)
        except psycopg.Error as error:
            raise StoreError(f"{self.where}: {_one_line(error)}") from error

    def close(self) -> None:
        self.pg.close()
