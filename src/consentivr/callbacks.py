"""The survey team's side of the callback purpose: an accountable list, and "done".

``callbacks export`` hands out the list of numbers that may be called back
(:func:`consentivr.subject.callback_list`); :func:`record_export` notes each run
(when, by whom, how many entries, which calls) and never a number.
``callbacks done`` (:func:`mark_done`) clears a called-back caller's number at once
(data minimisation: it is no longer needed) instead of at the end of the callback
purpose's retention, and notes who and when.

Both audit tables sit outside the consent log's personal fields: they hold our own
call ids, the staff member's name and times. Clearing a number is the purge's
redaction (``caller_number`` and the row's salt go, the digest stays), so the hash
chain still verifies and the number cannot be guessed back from the digest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from consentivr.errors import ConsentivrError, StoreError
from consentivr.store import iso

CALLBACKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS callback_done (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,           -- a call whose clear number was cleared
    marked_call_id TEXT NOT NULL,    -- the call the team marked done (the same, or a
                                     -- later call from that number)
    done_by TEXT NOT NULL,
    done_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS callback_done_call ON callback_done(call_id);
CREATE TABLE IF NOT EXISTS callback_exports (
    id INTEGER PRIMARY KEY,
    exported_at TEXT NOT NULL,
    exported_by TEXT NOT NULL,
    as_of TEXT NOT NULL,             -- the moment the list was drawn up for
    entries INTEGER NOT NULL         -- how many numbers it held (never the numbers)
);
CREATE TABLE IF NOT EXISTS callback_export_calls (
    export_id INTEGER NOT NULL REFERENCES callback_exports(id),
    call_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS callback_export_calls_call ON callback_export_calls(call_id);
"""

_MAX_NAME = 100


def staff_name(text: str) -> str:
    """``--by``: who did it, as one printable line."""
    name = " ".join(text.split())
    if not name or not name.isprintable() or len(name) > _MAX_NAME:
        raise ConsentivrError(f"--by {text!r}: expected the name of who did it "
                              f"(up to {_MAX_NAME} characters), e.g. --by 'J. de Vries'")
    return name


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One atomic write (the log runs in autocommit mode: ``with conn`` is not one)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _has_tables(conn: sqlite3.Connection) -> bool:
    """Readers create nothing: no table yet means no run yet."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                        "name='callback_exports'").fetchone() is not None


def _schema(conn: sqlite3.Connection) -> None:
    try:
        conn.executescript(CALLBACKS_SCHEMA)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the callback audit tables: {exc}") from exc


# --- export runs --------------------------------------------------------------------------


def record_export(conn: sqlite3.Connection, entries: Sequence[dict[str, Any]], by: str,
                  at: float, as_of: float) -> int:
    """Note one export run and the calls it listed; returns the run's id."""
    _schema(conn)
    try:
        with _transaction(conn):
            cur = conn.execute(
                "INSERT INTO callback_exports (exported_at, exported_by, as_of, entries) "
                "VALUES (?, ?, ?, ?)", (iso(at), staff_name(by), iso(as_of), len(entries)))
            run_id = int(cur.lastrowid or 0)
            conn.executemany(
                "INSERT INTO callback_export_calls (export_id, call_id) VALUES (?, ?)",
                [(run_id, e["call_id"]) for e in entries])
    except sqlite3.Error as exc:
        raise StoreError(f"cannot record the export run: {exc}") from exc
    return run_id


def export_runs(conn: sqlite3.Connection, since: str | None = None,
                until: str | None = None) -> list[dict[str, Any]]:
    """Export runs, oldest first (``since``/``until``: ISO times, for the DPO's report)."""
    if not _has_tables(conn):
        return []
    rows = conn.execute(
        "SELECT id, exported_at, exported_by, as_of, entries FROM callback_exports "
        "WHERE exported_at >= ? AND exported_at < ? ORDER BY id",
        (since or "", until or "\uffff")).fetchall()
    return [dict(r) for r in rows]


# --- done ------------------------------------------------------------------------------------


class DoneStatus(StrEnum):
    CLEARED = "cleared"  # the number is gone now
    ALREADY_CLEARED = "already_cleared"  # done before, purged, erased or withdrawn
    NOT_A_CALLBACK = "not_a_callback"  # the caller never said yes to a callback
    UNKNOWN = "unknown"  # no such call in the log


@dataclass(frozen=True)
class DoneResult:
    call_id: str
    status: DoneStatus
    numbers_cleared: int = 0  # rows whose clear number went: the call, and earlier
    #                           yes-calls from the same number
    done_by: str | None = None  # for ALREADY_CLEARED after an earlier "done"
    done_at: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is DoneStatus.CLEARED

    def to_json(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "status": self.status.value,
                "numbers_cleared": self.numbers_cleared, "done_by": self.done_by,
                "done_at": self.done_at}


def mark_done(conn: sqlite3.Connection, call_ids: Iterable[str], by: str,
              at: float) -> list[DoneResult]:
    """The team has called these callers back: clear their numbers now.

    Every row of the same caller that still holds the number in clear is cleared
    too, or the number would come back on the next export from an earlier call.
    Each id is its own transaction; an unknown or already cleared id is a result,
    not an error.
    """
    name = staff_name(by)
    _schema(conn)
    results: list[DoneResult] = []
    for call_id in call_ids:
        try:
            results.append(_done_one(conn, call_id.strip(), name, at))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot clear the number of call {call_id}: {exc}") from exc
    return results


def _done_one(conn: sqlite3.Connection, call_id: str, by: str, at: float) -> DoneResult:
    with _transaction(conn):
        row = conn.execute(
            "SELECT seq, caller_hash, caller_number, callback_until FROM calls "
            "WHERE call_id = ?", (call_id,)).fetchone()
        if row is None:
            return DoneResult(call_id, DoneStatus.UNKNOWN)
        if row["caller_number"] is None:
            earlier = conn.execute(
                "SELECT done_by, done_at FROM callback_done WHERE call_id = ? ORDER BY id "
                "LIMIT 1", (call_id,)).fetchone()
            if earlier is not None:
                return DoneResult(call_id, DoneStatus.ALREADY_CLEARED,
                                  done_by=earlier["done_by"], done_at=earlier["done_at"])
            status = (DoneStatus.ALREADY_CLEARED if row["callback_until"] is not None
                      else DoneStatus.NOT_A_CALLBACK)
            return DoneResult(call_id, status)
        same = conn.execute(
            "SELECT seq, call_id FROM calls WHERE caller_number IS NOT NULL AND "
            "(seq = ? OR caller_number = ? OR (caller_hash IS NOT NULL AND caller_hash = ?))",
            (row["seq"], row["caller_number"], row["caller_hash"])).fetchall()
        # The purge's redaction: the salt goes with the number, the digest stays.
        conn.executemany(
            "UPDATE calls SET caller_number=NULL, personal_salt=NULL WHERE seq=?",
            [(r["seq"],) for r in same])
        stamp = iso(at)
        conn.executemany(
            "INSERT INTO callback_done (call_id, marked_call_id, done_by, done_at) "
            "VALUES (?, ?, ?, ?)", [(r["call_id"], call_id, by, stamp) for r in same])
    return DoneResult(call_id, DoneStatus.CLEARED, numbers_cleared=len(same),
                      done_by=by, done_at=stamp)


def done_runs(conn: sqlite3.Connection, since: str | None = None,
              until: str | None = None) -> list[dict[str, Any]]:
    """How many numbers each person cleared, per day (for the DPO's report)."""
    if not _has_tables(conn):
        return []
    rows = conn.execute(
        "SELECT substr(done_at, 1, 10) AS day, done_by, count(*) AS numbers_cleared "
        "FROM callback_done WHERE done_at >= ? AND done_at < ? GROUP BY day, done_by "
        "ORDER BY day, done_by", (since or "", until or "\uffff")).fetchall()
    return [dict(r) for r in rows]


# --- one call's history ------------------------------------------------------------------------


def call_history(conn: sqlite3.Connection, call_id: str) -> dict[str, Any]:
    """What the survey team did with one call: the exports that listed it, and "done"."""
    if not _has_tables(conn):
        return {"exports": [], "done": []}
    exports = conn.execute(
        "SELECT e.id, e.exported_at, e.exported_by, e.entries FROM callback_exports e "
        "JOIN callback_export_calls c ON c.export_id = e.id WHERE c.call_id = ? "
        "ORDER BY e.id", (call_id,)).fetchall()
    done = conn.execute(
        "SELECT done_by, done_at, marked_call_id FROM callback_done WHERE call_id = ? "
        "ORDER BY id", (call_id,)).fetchall()
    return {"exports": [dict(r) for r in exports], "done": [dict(r) for r in done]}
