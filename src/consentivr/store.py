"""The consent log: one SQLite row per call, hash-chained, durably committed.

The database runs in WAL mode with ``synchronous=FULL``: when :meth:`ConsentLog.append`
returns, the decision survives a power cut. :class:`GroupCommitter` batches the
rows of concurrent calls into one transaction (one fsync) from a single writer
thread, so the service never blocks its event loop on the disk.

Tamper evidence: every row stores ``row_hash = sha256(prev_hash, proof fields,
personal_digest)``. ``personal_digest`` hashes the personal fields with a random
per-row salt. Redaction (purge, erasure) removes the personal fields *and the salt*,
keeping the digest, so the chain still verifies and nothing can be guessed back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import queue
import secrets
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consentivr.callers import UNPARSEABLE, WITHHELD, normalise, spellings
from consentivr.errors import StoreError
from consentivr.logschema import CALLS, create_table
from consentivr.messages import DecisionRecord
from consentivr.paths import (
    check_not_writable_by_others,
    check_owner,
    check_parents,
    make_private_dir,
)
from consentivr.schemaversion import SQLITE, check_version

if TYPE_CHECKING:
    from consentivr.consentlog import ConsentLogBackend

GENESIS = "0" * 64
SCHEMA_VERSION = 1

# Fields kept after redaction: what was decided, when, on which notice.
PROOF_FIELDS = (
    "seq", "call_id", "flow", "language", "notice_version", "started_at", "decided_at",
    "decisions", "retention_until", "outcome",
)
# Fields removed by purge and erasure.
PERSONAL_FIELDS = (
    "uniqueid", "linkedid", "channel", "caller_hash", "caller_number", "keys", "recording_path",
)

# The columns are consentivr.logschema.CALLS, shared with the PostgreSQL log.
_SCHEMA = create_table("calls", CALLS, "sqlite") + """;
CREATE INDEX IF NOT EXISTS calls_caller_hash ON calls(caller_hash);
CREATE INDEX IF NOT EXISTS calls_recording_until ON calls(recording_until)
    WHERE recording_path IS NOT NULL AND recording_purged_at IS NULL;
CREATE INDEX IF NOT EXISTS calls_decided_at ON calls(decided_at);
CREATE INDEX IF NOT EXISTS calls_uniqueid ON calls(uniqueid);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# The recording times the AMI listener writes (``?`` placeholders; pgstore translates):
# the caller's latest row, only if it was recorded and has not stopped yet.
RECORDING_STARTED_SQL = (
    "UPDATE calls SET recording_started_at=? WHERE seq=(SELECT max(seq) FROM calls "
    "WHERE uniqueid=?) AND recording_confirmed=1 AND recording_stopped_at IS NULL")
RECORDING_STOPPED_SQL = (
    "UPDATE calls SET recording_stopped_at=? WHERE seq=(SELECT max(seq) FROM calls "
    "WHERE uniqueid=?) AND recording_confirmed=1 AND recording_stopped_at IS NULL")


def iso(epoch: float) -> str:
    """Fixed-width UTC timestamps, so that text order is time order."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# Built once: json.dumps() with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_SORTED = json.JSONEncoder(sort_keys=True)
_PLAIN = json.JSONEncoder()


def canonical(value: object) -> bytes:
    return _CANONICAL.encode(value).encode()


def personal_digest(row: Mapping[str, Any], salt: str) -> str:
    personal = {k: row.get(k) for k in PERSONAL_FIELDS}
    return hashlib.sha256(salt.encode() + canonical(personal)).hexdigest()


def chain_hash(prev_hash: str, row: Mapping[str, Any], digest: str) -> str:
    proof = {k: row.get(k) for k in PROOF_FIELDS}
    if row.get("node") is not None:
        # A shared (PostgreSQL) log binds the node that wrote the row into the chain;
        # single-node SQLite rows have no node, so their hashes are unchanged.
        proof["node"] = row["node"]
    return hashlib.sha256(prev_hash.encode() + canonical(proof) + digest.encode()).hexdigest()


@dataclass(frozen=True)
class CallerKey:
    """HMAC key that pseudonymises caller numbers in the log.

    ``region`` (``callers.default_region``) reads national numbers: every number
    is normalised to E.164 before it is hashed (see :mod:`consentivr.callers`).
    """

    key: bytes
    region: str | None = None

    def pseudonym(self, number: str | None) -> str | None:
        """The HMAC of exactly this text (no normalisation): for lookups."""
        if not number:
            return None
        return hmac.new(self.key, number.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()

    def identify(self, raw: str | None) -> tuple[str, str | None]:
        """What the log keeps of a caller: (pseudonym or marker, E.164 or None)."""
        caller = normalise(raw, self.region)
        if caller.e164 is not None:
            return str(self.pseudonym(caller.e164)), caller.e164
        if caller.kind == WITHHELD:
            return WITHHELD, None
        return f"{UNPARSEABLE}{self.pseudonym(caller.raw)}", None

    def lookup_hashes(self, text: str) -> list[str]:
        """Every caller_hash a row about this number may hold, in any spelling."""
        forms = spellings(text, self.region)
        hashes = [str(self.pseudonym(f)) for f in forms]
        return hashes + [f"{UNPARSEABLE}{h}" for h in hashes]


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating 0600, in a 0700 dir) the log in WAL mode with full durability.

    Refuses a log in a world-writable dir or owned by another user (see
    :mod:`consentivr.paths`).
    """
    try:
        make_private_dir(path.parent)
        check_parents(path)
        check_owner(path, "consent log")
        check_not_writable_by_others(path, "consent log")
    except StoreError as exc:
        raise StoreError(f"{path}: cannot open the consent log: {exc}") from exc
    try:
        if not path.exists():
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
            os.close(fd)
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        fresh = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name='calls'").fetchone()[0] == 0
        conn.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the consent log: {exc}") from exc
    try:
        check_version(SQLITE, conn, str(path), fresh=fresh)
    except (StoreError, sqlite3.Error) as exc:
        conn.close()
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{path}: cannot open the consent log: {exc}") from exc
    return conn


def database_is_world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def load_or_create_key(db_path: Path, configured: bytes | None,
                       region: str | None = None) -> CallerKey:
    """The configured key, else a random one kept 0600 next to the database.

    ``region`` is ``callers.default_region``: the key normalises numbers with it.
    A key file must be ours (or root's), 0600, and in a dir others cannot write.
    """
    if configured:
        return CallerKey(configured, region)
    key_path = db_path.with_name(db_path.name + ".key")
    make_private_dir(key_path.parent)
    check_parents(key_path)
    check_owner(key_path, "caller key")
    try:
        if not os.path.lexists(key_path):
            fd = os.open(key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_hex(32).encode())
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{key_path}: the caller key is not a regular file")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise StoreError(f"{key_path}: the caller key is readable by others: chmod 600 it")
            return CallerKey(fh.read(4096).strip(), region)
    except OSError as exc:
        raise StoreError(f"{key_path}: cannot read or create the caller key: {exc}") from exc


class ConsentLog:
    """Synchronous access to the consent log. One instance per thread."""

    def __init__(self, path: Path, caller_key: CallerKey) -> None:
        self.path = path
        self.conn = open_database(path)
        self.caller_key = caller_key

    def close(self) -> None:
        self.conn.close()

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def savepoint(self) -> contextlib.AbstractContextManager[None]:
        """A nested transaction: a failure undoes only what ran inside it."""
        return _savepoint(self.conn)

    # -- writing ----------------------------------------------------------

    def _row(self, rec: DecisionRecord) -> dict[str, Any]:
        callback_yes = rec.callback_until is not None
        # The adapters pass the raw caller text: normalised here, before hashing.
        caller_hash, e164 = self.caller_key.identify(rec.caller)
        return {
            "call_id": rec.call_id,
            "uniqueid": rec.channel_id,
            "linkedid": rec.linkedid,
            "channel": rec.channel_name,
            "caller_hash": caller_hash,
            # The number in clear only for callers who asked to be called back,
            # and only a real number (E.164): withheld or garbage is never kept.
            "caller_number": e164 if callback_yes else None,
            "callback_until": iso(rec.callback_until) if rec.callback_until else None,
            "flow": rec.flow,
            "language": rec.language,
            "notice_version": rec.notice_version,
            "started_at": iso(rec.started_at),
            "decided_at": iso(rec.decided_at),
            "keys": _PLAIN.encode([
                {"digit": k.digit, "at": iso(k.at), "step": k.step} for k in rec.keys
            ]),
            "decisions": _SORTED.encode(dict(rec.decisions)),
            "retention_until": _SORTED.encode(
                {k: iso(v) for k, v in rec.retention_until.items()}
            ),
            "recording_path": rec.recording_path,
            "recording_until": iso(rec.recording_until) if rec.recording_until else None,
            "outcome": rec.outcome,
        }

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable transaction (one fsync) for every write made inside it.

        Writes that open their own transaction (``append_many``, ``_update``) join an
        open one instead, so :class:`GroupCommitter` can commit a batch at once.
        """
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            if self.conn.in_transaction:  # a write inside may have committed it already
                self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def append_many(self, records: list[DecisionRecord]) -> None:
        """Commit these rows in one durable transaction, chained in order."""
        try:
            with self.transaction():
                last = self.conn.execute(
                    "SELECT seq, row_hash FROM calls ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = (last["seq"], last["row_hash"]) if last else (0, GENESIS)
                for rec in records:
                    seq += 1
                    row = self._row(rec)
                    row["seq"] = seq
                    salt = secrets.token_hex(16)
                    digest = personal_digest(row, salt)
                    row.update(personal_salt=salt, personal_digest=digest, prev_hash=prev,
                               row_hash=chain_hash(prev, row, digest))
                    prev = row["row_hash"]
                    cols = ",".join(row)
                    marks = ",".join("?" * len(row))
                    self.conn.execute(f"INSERT INTO calls ({cols}) VALUES ({marks})",
                                      list(row.values()))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot write the consent log: {exc}") from exc

    def append(self, record: DecisionRecord) -> None:
        self.append_many([record])

    def mark_recording(self, call_id: str, confirmed: bool, error: str | None,
                       at: float) -> None:
        self._update(
            "UPDATE calls SET recording_confirmed=?, recording_error=?, "
            "recording_started_at=? WHERE call_id=?",
            (int(confirmed), error, iso(at) if confirmed else None, call_id),
        )

    def void_late_consent(self, call_id: str, reason: str, at: float) -> None:
        """A decision that was committed only after the call went on unrecorded.

        The dialplan was told "error", so nothing in it may be acted on: the
        callback number is dropped (salt too, as purge does, so the chain still
        verifies) and the row counts as withdrawn by the system.
        """
        self._update(
            "UPDATE calls SET caller_number=NULL, "
            "personal_salt=CASE WHEN caller_number IS NULL THEN personal_salt ELSE NULL END, "
            "recording_confirmed=0, recording_error=?, "
            "withdrawn_at=COALESCE(withdrawn_at, ?), withdrawn_by=COALESCE(withdrawn_by, ?) "
            "WHERE call_id=?",
            (reason, iso(at), "system", call_id),
        )

    def recording_started(self, uniqueid: str, at: float) -> None:
        """When the recorded caller was first connected to a person (see
        :meth:`consentivr.withdrawal.RecordingLog.recording_started`)."""
        self._update(RECORDING_STARTED_SQL, (iso(at), uniqueid))

    def recording_stopped(self, uniqueid: str, at: float) -> None:
        self._update(RECORDING_STOPPED_SQL, (iso(at), uniqueid))

    def _update(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            with self.transaction():
                self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot update the consent log: {exc}") from exc

    # -- reading ----------------------------------------------------------

    def calls(
        self, limit: int | None = None, newest_first: bool = True
    ) -> Iterator[dict[str, Any]]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM calls ORDER BY seq {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.conn.execute(sql):
            yield public_row(row)

    def calls_of(self, number: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The calls of one caller, in any spelling the number was logged under."""
        hashes = self.caller_key.lookup_hashes(number)
        numbers = spellings(number, self.caller_key.region)
        sql = (f"SELECT * FROM calls WHERE caller_hash IN ({','.join('?' * len(hashes))}) "
               f"OR caller_number IN ({','.join('?' * len(numbers))}) ORDER BY seq DESC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [public_row(r) for r in self.conn.execute(sql, (*hashes, *numbers))]

    def call(self, call_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT * FROM calls WHERE call_id=? OR uniqueid=? ORDER BY seq LIMIT 1",
            (call_id, call_id),
        ).fetchone()
        return public_row(row) if row else None


def public_row(row: sqlite3.Row) -> dict[str, Any]:
    """A row as the CLI shows it: JSON fields decoded, salts and hashes left out."""
    data = dict(row)
    for key in ("keys", "decisions", "retention_until"):
        if data.get(key):
            data[key] = json.loads(data[key])
    for key in ("personal_salt",):
        data.pop(key, None)
    return data


class GroupCommitter:
    """One writer thread: concurrent calls' rows share one transaction and one fsync.

    A *lazy* write (:meth:`submit` with ``lazy=True``) is for what nobody waits on,
    such as the recording times the AMI listener writes: it is held until the next
    ordinary write and goes at the end of that batch, or, when none comes within
    ``linger`` seconds, commits on its own. So it costs no transaction (no fsync)
    of its own on a busy PBX. Its future still resolves only once it is durable
    (or fails), and :meth:`flush` and :meth:`close` write it out at once.
    """

    def __init__(self, log_factory: Any, max_batch: int = 256, linger: float = 0.5) -> None:
        self._factory = log_factory
        self._queue: queue.Queue[tuple[str, Any, Future[None], bool] | None] = queue.Queue()
        self._max_batch = max_batch
        self.linger = linger
        self._thread = threading.Thread(target=self._run, name="consent-log", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, kind: str, payload: Any, lazy: bool = False) -> Future[None]:
        fut: Future[None] = Future()
        self._queue.put((kind, payload, fut, lazy))
        return fut

    def flush(self) -> Future[None]:
        """Resolves once every write submitted before it, lazy ones too, was tried
        (a write that failed inside the batch is retried alone just after)."""
        return self.submit(FLUSH, ())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            log = self._factory()
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        lazy: list[tuple[str, Any, Future[None]]] = []
        deadline = 0.0  # when the oldest lazy write has waited long enough
        try:
            closing = False
            while not closing:
                try:
                    wait = max(0.0, deadline - time.monotonic()) if lazy else None
                    item = self._queue.get(timeout=wait)
                except queue.Empty:  # lingered long enough: the lazy writes go alone
                    item = _NOTHING
                batch: list[tuple[str, Any, Future[None]]] = []
                while item is not _NOTHING:
                    if item is None:
                        closing = True
                        break
                    kind, payload, fut, is_lazy = item
                    if is_lazy:
                        if not lazy:
                            deadline = time.monotonic() + self.linger
                        lazy.append((kind, payload, fut))
                    else:
                        batch.append((kind, payload, fut))
                    if len(batch) + len(lazy) >= self._max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if not batch and lazy and not closing and item is not _NOTHING \
                        and len(lazy) < self._max_batch:
                    continue  # only lazy writes so far: wait for company
                # Lazy writes go last, after the marks they may depend on.
                batch += lazy
                lazy = []
                if not batch:
                    continue
                try:
                    self._write(log, batch)
                except Exception as exc:  # the writer must outlive any one batch
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
        finally:
            log.close()

    @staticmethod
    def _write(log: ConsentLogBackend, batch: list[tuple[str, Any, Future[None]]]) -> None:
        """The whole batch in one transaction: one fsync however many calls wrote.

        Appends go first, chained in order, then the updates. Each runs in its own
        savepoint, so a failing write undoes only itself; it is then tried once more
        on its own after the commit (so a write that cannot join a transaction still
        works), and only that retry's outcome reaches its future. Futures are
        resolved only once their write is durable.
        """
        appends = [p for k, p, _ in batch if k == "append"]
        writes: list[tuple[Callable[[], object], list[Future[None]]]] = []
        if appends:
            # _apply looks the method up inside the write's try: a log that opens
            # lazily may raise right there.
            writes.append((functools.partial(_apply, log, "append_many", (appends,)),
                           [f for k, _, f in batch if k == "append"]))
        for kind, payload, fut in batch:
            if kind == FLUSH:
                writes.append((_nothing, [fut]))
            elif kind != "append":
                writes.append((functools.partial(_apply, log, kind, payload), [fut]))
        durable: list[Future[None]] = []
        retry: list[tuple[Callable[[], object], list[Future[None]]]] = []
        pending = deque(writes)
        while pending:
            done: list[Future[None]] = []
            try:
                with log.transaction():
                    while pending:
                        write, futures = pending.popleft()
                        try:
                            with log.savepoint():
                                write()
                        except Exception:
                            retry.append((write, futures))
                            continue
                        done.extend(futures)
                        if not log.in_transaction:
                            break  # that write committed on its own: what is done is durable
            except BaseException as exc:  # the commit failed: none of these is durable
                error: BaseException = exc
                if isinstance(exc, sqlite3.Error):
                    error = StoreError(f"{log.path}: cannot write the consent log: {exc}")
                for fut in durable:  # committed by an earlier round
                    _settle(fut)
                failed = [*done, *(f for _, fs in (*pending, *retry) for f in fs)]
                for fut in failed:
                    _settle(fut, error)
                return
            durable.extend(done)
        for fut in durable:
            _settle(fut)
        for write, futures in retry:
            try:
                write()
            except BaseException as exc:
                for fut in futures:
                    _settle(fut, exc)
            else:
                for fut in futures:
                    _settle(fut)


FLUSH = "flush"  # a write of nothing: resolves once what was queued before it is durable
_NOTHING: Any = object()


def _nothing() -> None:
    return None


def _settle(fut: Future[None], error: BaseException | None = None) -> None:
    """Resolve a write's future; one its caller cancelled is left alone, so the
    writer thread never trips over it."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _apply(log: ConsentLogBackend, kind: str, payload: Any) -> object:
    """One queued write: the log's method named ``kind``, called with ``payload``."""
    return getattr(log, kind)(*payload)


@contextlib.contextmanager
def _savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """A nested transaction: a failure undoes only what ran inside it."""
    conn.execute("SAVEPOINT consentivr_write")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK TO consentivr_write")
            conn.execute("RELEASE consentivr_write")
        raise
    if conn.in_transaction:  # else the write committed, which released the savepoint
        conn.execute("RELEASE consentivr_write")
