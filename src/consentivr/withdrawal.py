"""Withdrawal of consent: log it, and delete or keep the partial recording.

Used by the AMI listener (the caller pressed the withdrawal keys; the dialplan has
already stopped MixMonitor) and by ``consentivr recording stop`` (an agent, for a
caller who asked out loud; :func:`stop_recording` stops MixMonitor over AMI first).

A withdrawal covers the whole call: ``withdrawn_at``/``withdrawn_by`` are set once,
so a second press or a second ``recording stop`` keeps the first time and author.
Withdrawal on a call that was never recorded is logged and changes nothing else.
None of the columns written here is part of the hash chain (they are neither proof
nor personal fields), so the log still verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consentivr.errors import AmiError, ConsentivrError, StoreError
from consentivr.recordingsdir import RecordingsDir, RecordingsUnavailable, UnsafePath
from consentivr.store import (
    RECORDING_STARTED_SQL,
    RECORDING_STOPPED_SQL,
    iso,
    open_database,
    parse_iso,
)

if TYPE_CHECKING:
    from consentivr.settings import Settings

log = logging.getLogger(__name__)

WITHDRAWN_BY = ("caller", "agent")
ON_WITHDRAW = ("delete", "keep")

_COLUMNS = (
    "seq, call_id, uniqueid, channel, recording_path, recording_confirmed, "
    "recording_started_at, recording_stopped_at, withdrawn_at, withdrawn_by, "
    "recording_purged_at"
)


class WithdrawalError(ConsentivrError):
    """A withdrawal that cannot be applied (unknown call, AMI unreachable...)."""


class RecordingNotDeleted(WithdrawalError):
    """The withdrawal is logged, but the recordings dir could not be opened."""


@dataclass(frozen=True)
class Withdrawal:
    """What a withdrawal did."""

    call_id: str
    by: str
    at: float
    recorded: bool  # a recording had been confirmed started for this call
    first: bool  # False: already withdrawn before; its time and author were kept
    file: str  # deleted | kept | gone (already deleted or never written) | none | refused
    detail: str = ""  # why a file was refused

    def describe(self) -> str:
        if not self.recorded:
            what = "was never recorded: nothing to stop"
        else:
            what = {
                "deleted": "recording stopped; the partial recording is deleted",
                "kept": "recording stopped; the partial recording is kept, marked withdrawn",
                "gone": "recording stopped; no recording file is left",
                "refused": f"recording stopped; the file was NOT deleted ({self.detail})",
            }.get(self.file, "recording stopped")
        when = "withdrawal logged" if self.first else "already withdrawn before"
        return f"call {self.call_id}: {what} ({when}, by {self.by})"


class RecordingLog:
    """The consent log columns written after the decision: withdrawal and recording times.

    Short transactions on its own connection (WAL: the service's writer keeps going).
    In the service only withdrawals and reads go here; the recording times share the
    group committer's batches (:meth:`consentivr.store.ConsentLog.recording_started`).
    """

    def __init__(self, path: Path, conn: Any = None) -> None:
        self.path = path
        self.conn = conn if conn is not None else open_database(path)

    @classmethod
    def for_settings(cls, settings: Settings) -> RecordingLog:
        """On the configured backend (a shared PostgreSQL log too)."""
        if settings.database_url is None:
            return cls(settings.database)
        from consentivr.consentlog import open_reader

        conn = open_reader(settings)
        return cls(conn.where, conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> RecordingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, call_id: str) -> dict[str, Any] | None:
        """The row of our call id or of Asterisk's uniqueid of the caller's channel."""
        try:
            row = self.conn.execute(
                f"SELECT {_COLUMNS} FROM calls WHERE call_id=? OR uniqueid=? "
                "ORDER BY seq DESC LIMIT 1", (call_id, call_id)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the consent log: {exc}") from exc
        return dict(row) if row else None

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        try:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                return self.conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot update the consent log: {exc}") from exc

    def withdraw(self, call_id: str, at: float, by: str, recorded: bool) -> bool:
        """Log the withdrawal; False if the call was withdrawn before (nothing changes)."""
        return self._write(
            "UPDATE calls SET withdrawn_at=?, withdrawn_by=?, "
            "recording_stopped_at=COALESCE(recording_stopped_at, ?) "
            "WHERE call_id=? AND withdrawn_at IS NULL",
            (iso(at), by, iso(at) if recorded else None, call_id)) > 0

    def recording_started(self, uniqueid: str, at: float) -> bool:
        """The recorded caller was first connected to a person: audio starts now.

        MixMonitor runs with option ``b``, so the time it was confirmed (written at
        the decision) is not when it began to record; this is.
        """
        return self._write(RECORDING_STARTED_SQL, (iso(at), uniqueid)) > 0

    def recording_stopped(self, uniqueid: str, at: float) -> bool:
        return self._write(RECORDING_STOPPED_SQL, (iso(at), uniqueid)) > 0

    def recorded_since(self, since: float) -> list[str]:
        """Uniqueids of calls recorded (and not withdrawn) that were decided after ``since``."""
        try:
            rows = self.conn.execute(
                "SELECT uniqueid FROM calls WHERE decided_at >= ? "
                "AND recording_confirmed=1 AND withdrawn_at IS NULL AND uniqueid IS NOT NULL",
                (iso(since),)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the consent log: {exc}") from exc
        return [r["uniqueid"] for r in rows]

    def purged(self, call_id: str, at: float) -> None:
        self._write("UPDATE calls SET recording_purged_at=? WHERE call_id=? "
                    "AND recording_purged_at IS NULL", (iso(at), call_id))


def delete_recording(recordings_dir: Path, path: str,
                     previous_dirs: Sequence[str] = ()) -> tuple[str, str]:
    """Unlink one recording safely (no symlinks, nothing outside the dir).

    Returns ``("deleted" | "gone" | "refused", detail)``. Raises
    :class:`~consentivr.recordingsdir.RecordingsUnavailable` when the dir cannot be
    opened: a file on a volume not mounted is not "gone".
    """
    with RecordingsDir(recordings_dir, previous_dirs) as rec:
        try:
            parts = rec.relative(path)
            if not stat.S_ISREG(rec.lstat(parts).st_mode):
                return "refused", "not a regular file"
            rec.unlink(parts)
        except FileNotFoundError:
            return "gone", ""
        except UnsafePath as exc:
            return "refused", str(exc)
        except OSError as exc:
            return "refused", exc.strerror or str(exc)
    return "deleted", ""


def apply_withdrawal(log_: RecordingLog, recordings_dir: Path, call_id: str, by: str,
                     at: float, on_withdraw: str,
                     previous_dirs: Sequence[str] = ()) -> Withdrawal:
    """Log a withdrawal of ``call_id`` (or uniqueid) and apply ``on_withdraw`` to its file.

    Raises :class:`WithdrawalError` for an unknown call, and when the recordings
    dir cannot be opened (the withdrawal is logged; the file is not marked gone).
    """
    if by not in WITHDRAWN_BY or on_withdraw not in ON_WITHDRAW:
        raise ValueError(f"by={by!r}, on_withdraw={on_withdraw!r}")
    row = log_.find(call_id)
    if row is None:
        raise WithdrawalError(f"no call with id {call_id!r} in {log_.path}")
    call_id = row["call_id"]
    path = row["recording_path"]
    recorded = bool(row["recording_confirmed"] == 1 and path)
    first = log_.withdraw(call_id, at, by, recorded)
    if not first:
        by, at = row["withdrawn_by"] or by, _parsed(row["withdrawn_at"], at)
    if not recorded:
        return Withdrawal(call_id, by, at, recorded=False, first=first, file="none")
    if row["recording_purged_at"] is not None:
        return Withdrawal(call_id, by, at, True, first, "gone")
    if on_withdraw == "keep":
        return Withdrawal(call_id, by, at, True, first, "kept")
    try:
        outcome, detail = delete_recording(recordings_dir, path, previous_dirs)
    except RecordingsUnavailable as exc:
        raise RecordingNotDeleted(f"call {call_id}: withdrawal logged, but the recording was NOT "
                              f"deleted: {exc}") from exc
    if outcome in ("deleted", "gone"):
        log_.purged(call_id, time.time())
    return Withdrawal(call_id, by, at, True, first, outcome, detail)


def _parsed(text: str | None, default: float) -> float:
    try:
        return parse_iso(text) if text else default
    except ValueError:
        return default


# --- the agent's side: ``consentivr recording stop`` ---------------------------------


async def stop_mixmonitor(ami: Any, channel: str) -> str:
    """Stop MixMonitor on a channel: ``stopped``, ``not_running`` or ``call_ended``.

    ``ami`` is anything with ``async action(fields)`` raising AmiError on an error
    response, like :class:`consentivr.ami.AmiPool`.
    """
    try:
        await ami.action({"Action": "StopMixMonitor", "Channel": channel})
    except AmiError as exc:
        text = str(exc).lower()
        if "no such channel" in text:
            return "call_ended"
        if "could not stop" in text:
            return "not_running"  # e.g. the caller withdrew by key already
        raise
    return "stopped"


async def stop_recording(settings: Any, call_id: str, by: str = "agent",
                         clock: Any = time.time) -> tuple[Withdrawal, str]:
    """Stop the recording of a call now and log a withdrawal by ``by``.

    Returns the withdrawal and how the recording stopped: ``stopped`` (now, over AMI),
    ``not_running``, ``call_ended``, ``ended`` (the log says it had ended already) or
    ``not_needed`` (never recorded).
    Raises :class:`WithdrawalError` (unknown call, no AMI) or AmiError.
    """
    from consentivr.ami import AmiPool

    if settings.database_url is None and not settings.database.exists():
        raise WithdrawalError(f"no call with id {call_id!r}: {settings.database} does not "
                              "exist yet")
    with RecordingLog.for_settings(settings) as log_:
        row = await asyncio.to_thread(log_.find, call_id)
    if row is None:
        raise WithdrawalError(f"no call with id {call_id!r} in {settings.database}")
    recorded = row["recording_confirmed"] == 1 and row["recording_path"]
    stopped = "not_needed"
    if recorded and row["recording_stopped_at"] is None:
        if not row["channel"]:
            raise WithdrawalError(f"call {row['call_id']}: its channel is not in the log "
                                  "(redacted?); cannot stop the recording")
        if settings.ami is None:
            raise WithdrawalError("no ami: section in the config: cannot stop the recording")
        pool = AmiPool(settings.ami)
        try:
            await pool.connect(wait=settings.ami.timeout)
            stopped = await stop_mixmonitor(pool, row["channel"])
        finally:
            with contextlib.suppress(Exception):
                pool.close()
    elif recorded:
        stopped = "ended"  # by key, an earlier stop, or the hang-up
    at = clock()
    with RecordingLog.for_settings(settings) as log_:
        result = await asyncio.to_thread(
            apply_withdrawal, log_, settings.recordings.dir, row["call_id"], by, at,
            settings.withdrawal.on_withdraw, settings.recordings.previous_dirs)
    log.info("%s", result.describe())
    return result, stopped
