"""Aggregate reads of the consent log for the DPO's report (``consentivr report``).

:class:`LogStats` is the small read interface the report uses; every figure is
computed by the database (``GROUP BY``), so a report over millions of rows keeps
only the aggregates in memory. :class:`SqliteLogStats` implements it on the
SQLite log; a PostgreSQL backend implements the same methods with its own SQL.

Nothing returned here is personal: no caller numbers, hashes, call ids or
channel names. The one exception is :meth:`LogStats.held_recordings`, whose
paths the report needs to check the files on disk; it never shows them.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Protocol

from consentivr.audit import ChainReport
from consentivr.callbacks import done_runs, export_runs
from consentivr.errors import StoreError
from consentivr.verifier import verify_log


@dataclass(frozen=True)
class Period:
    """Calls decided in ``[start, end)``: fixed-width ISO texts, or None for open ends."""

    start: str | None = None
    end: str | None = None

    def bounds(self) -> tuple[str, str]:
        # ISO texts sort as time; "" is before and "~" after every one of them.
        return (self.start or "", self.end or "~")

    def where(self, column: str = "decided_at") -> tuple[str, tuple[str, ...]]:
        """An SQL condition on ``column`` (always true for an open period) and its
        parameters. The whole log is read by one scan: the index on decided_at
        would cost a lookup per row."""
        if self.start is None and self.end is None:
            return "1", ()
        return f"{column} >= ? AND {column} < ?", self.bounds()


@dataclass(frozen=True)
class DecisionCount:
    flow: str
    purpose: str
    week: str  # the Monday (UTC) of the call's ISO week, YYYY-MM-DD
    decision: str
    calls: int


@dataclass(frozen=True)
class WithdrawalCount:
    by: str  # caller | agent | system
    count: int
    median_seconds: float | None  # from the start of the call to the withdrawal


@dataclass(frozen=True)
class RecordingTotals:
    count: int  # recordings confirmed started
    seconds: float  # audio time, where the log has both its start and its stop
    without_duration: int  # recordings whose stop (or start) is not in the log


@dataclass(frozen=True)
class HeldRecording:
    """A recording the log says is still on disk (not purged)."""

    flow: str
    path: str  # internal: to check the file; never shown
    decided_at: str
    recording_until: str | None


@dataclass(frozen=True)
class NoticeUse:
    flow: str
    language: str
    version: str
    calls: int
    first: str
    last: str


@dataclass(frozen=True)
class PurgeRun:
    run_id: int
    started_at: str
    finished_at: str | None
    status: str
    dry_run: bool
    recordings_deleted: int
    recordings_missing: int
    rows_redacted: int
    callers_cleared: int
    orphans_found: int
    orphans_deleted: int
    refused: int


class LogStats(Protocol):
    """What the report reads from a consent log."""

    def total_calls(self, period: Period) -> int: ...

    def decision_counts(self, period: Period) -> list[DecisionCount]: ...

    def withdrawals(self, period: Period) -> list[WithdrawalCount]: ...

    def recordings(self, period: Period) -> RecordingTotals: ...

    def held_recordings(self) -> Iterator[HeldRecording]: ...

    def rows_past_log_retention(self, cutoff: str) -> int: ...

    def purge_runs(self, period: Period) -> list[PurgeRun]: ...

    def erasures(self, period: Period) -> int: ...

    def access_requests(self, period: Period) -> int: ...

    def notice_versions(self, period: Period) -> list[NoticeUse]: ...

    def callback_exports(self, period: Period) -> list[dict[str, Any]]: ...

    def callbacks_done(self, period: Period) -> list[dict[str, Any]]: ...

    def verify(self) -> ChainReport: ...

    def close(self) -> None: ...


_SECONDS = "(julianday({b}) - julianday({a})) * 86400.0"


class SqliteLogStats:
    """:class:`LogStats` on the SQLite consent log, opened read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise StoreError(f"{path}: no consent log here (no calls so far?)")
        try:
            self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                        check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("SELECT 1 FROM calls LIMIT 1")
            tables = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot read the consent log: {exc}") from exc
        self._purge_log = "purge_runs" in tables
        self._requests_log = "subject_requests" in tables
        self._callbacks_log = "callback_exports" in tables
        self._grouped: dict[Period, list[sqlite3.Row]] = {}

    def close(self) -> None:
        self.conn.close()

    def _all(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the consent log: {exc}") from exc

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row:
        rows = self._all(sql, params)
        return rows[0]

    def total_calls(self, period: Period) -> int:
        where, params = period.where()
        return int(self._one(f"SELECT count(*) FROM calls WHERE {where}", params)[0])

    def _groups(self, period: Period) -> list[sqlite3.Row]:
        """One scan for decisions and notices: calls grouped by flow, day, the
        decisions' JSON text as stored, language and notice version. A flow has few
        distinct decision texts, so Python parses only the groups', never a row's."""
        if period not in self._grouped:
            where, params = period.where()
            self._grouped[period] = self._all(
                "SELECT flow, substr(decided_at, 1, 10) AS day, decisions, language, "
                "notice_version, count(*) AS n, min(decided_at) AS first, "
                f"max(decided_at) AS last FROM calls WHERE {where} "
                "GROUP BY flow, day, decisions, language, notice_version", params)
        return self._grouped[period]

    def decision_counts(self, period: Period) -> list[DecisionCount]:
        weeks: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for r in self._groups(period):
            day = date.fromisoformat(r["day"])
            monday = (day - timedelta(days=day.weekday())).isoformat()
            for purpose, decision in json.loads(r["decisions"]).items():
                weeks[(r["flow"], purpose, monday, str(decision))] += r["n"]
        return [DecisionCount(f, p, w, d, n) for (f, p, w, d), n in sorted(weeks.items())]

    def withdrawals(self, period: Period) -> list[WithdrawalCount]:
        # One scan; the database sorts only the withdrawn rows and returns, per
        # author, the count and the one or two middle values (the median).
        where, params = period.where()
        into = _SECONDS.format(a="started_at", b="withdrawn_at")
        rows = self._all(
            "SELECT by, n, avg(s) AS median FROM ("
            " SELECT by, s, n, row_number() OVER (PARTITION BY by ORDER BY s) AS k FROM ("
            "  SELECT coalesce(withdrawn_by, 'unknown') AS by, "
            f"  {into} AS s, count(*) OVER (PARTITION BY withdrawn_by) AS n "
            f"  FROM calls WHERE withdrawn_at IS NOT NULL AND {where}))"
            " WHERE k IN ((n + 1) / 2, (n + 2) / 2) GROUP BY by ORDER BY by", params)
        return [WithdrawalCount(r["by"], r["n"], r["median"]) for r in rows]

    def recordings(self, period: Period) -> RecordingTotals:
        where, params = period.where()
        span = _SECONDS.format(a="recording_started_at", b="recording_stopped_at")
        row = self._one(
            f"SELECT count(*), total({span}), "
            "sum(recording_started_at IS NULL OR recording_stopped_at IS NULL) "
            f"FROM calls WHERE recording_confirmed = 1 AND {where}", params)
        return RecordingTotals(int(row[0]), float(row[1] or 0.0), int(row[2] or 0))

    def held_recordings(self) -> Iterator[HeldRecording]:
        try:
            cur = self.conn.execute(
                "SELECT flow, recording_path, decided_at, recording_until FROM calls "
                "WHERE recording_path IS NOT NULL AND recording_purged_at IS NULL "
                "ORDER BY recording_until")
            while page := cur.fetchmany(5000):
                for r in page:
                    yield HeldRecording(r[0], r[1], r[2], r[3])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the consent log: {exc}") from exc

    def rows_past_log_retention(self, cutoff: str) -> int:
        return int(self._one("SELECT count(*) FROM calls WHERE decided_at <= ? "
                             "AND redacted_at IS NULL", (cutoff,))[0])

    def purge_runs(self, period: Period) -> list[PurgeRun]:
        if not self._purge_log:
            return []
        rows = self._all(
            "SELECT * FROM purge_runs WHERE kind = 'purge' AND started_at >= ? "
            "AND started_at < ? ORDER BY id", period.bounds())
        return [PurgeRun(
            run_id=r["id"], started_at=r["started_at"], finished_at=r["finished_at"],
            status=r["status"], dry_run=bool(r["dry_run"]),
            recordings_deleted=r["recordings_deleted"],
            recordings_missing=r["recordings_missing"], rows_redacted=r["rows_redacted"],
            callers_cleared=r["callers_cleared"], orphans_found=r["orphans_found"],
            orphans_deleted=r["orphans_deleted"], refused=r["refused"],
        ) for r in rows]

    def erasures(self, period: Period) -> int:
        if not self._purge_log:
            return 0
        return int(self._one("SELECT count(*) FROM purge_runs WHERE kind = 'erase' "
                             "AND started_at >= ? AND started_at < ?", period.bounds())[0])

    def access_requests(self, period: Period) -> int:
        if not self._requests_log:
            return 0  # no access request answered since requests were logged
        return int(self._one("SELECT count(*) FROM subject_requests WHERE kind = 'access' "
                             "AND at >= ? AND at < ?", period.bounds())[0])

    def callback_exports(self, period: Period) -> list[dict[str, Any]]:
        """Each ``callbacks export`` run: when, by whom, how many entries."""
        if not self._callbacks_log:
            return []
        return export_runs(self.conn, *period.bounds())

    def callbacks_done(self, period: Period) -> list[dict[str, Any]]:
        """Numbers cleared by ``callbacks done``, per day and person."""
        if not self._callbacks_log:
            return []
        return done_runs(self.conn, *period.bounds())

    def notice_versions(self, period: Period) -> list[NoticeUse]:
        uses: dict[tuple[str, str, str], list[Any]] = {}
        for r in self._groups(period):
            key = (r["flow"], r["language"], r["notice_version"])
            use = uses.setdefault(key, [0, r["first"], r["last"]])
            use[0] += r["n"]
            use[1], use[2] = min(use[1], r["first"]), max(use[2], r["last"])
        return sorted((NoticeUse(*key, n, first, last) for key, (n, first, last)
                       in uses.items()), key=lambda u: (u.flow, u.language, u.first))

    def verify(self) -> ChainReport:
        try:
            return verify_log(self.path)  # audit.verify_chain's rules, on every core
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the consent log: {exc}") from exc


def _pg_where(period: Period) -> tuple[str, tuple[str, ...]]:
    where, params = period.where()
    return ("TRUE" if where == "1" else where), params


_PG_SECONDS = "extract(epoch FROM ({b}::timestamptz - {a}::timestamptz))"


class PostgresLogStats(SqliteLogStats):
    """:class:`LogStats` on a shared PostgreSQL log: the same queries where the two
    dialects agree (through :class:`consentivr.pgstore.CompatConnection`), its own
    where they do not (time arithmetic, booleans, ``by`` is a keyword)."""

    def __init__(self, settings: Any) -> None:
        from consentivr.consentlog import open_reader

        self.settings = settings
        self.conn = open_reader(settings)
        self.path = self.conn.where
        # The migrations create them all.
        self._purge_log = self._requests_log = self._callbacks_log = True
        self._grouped = {}

    def total_calls(self, period: Period) -> int:
        where, params = _pg_where(period)
        return int(self._one(f"SELECT count(*) FROM calls WHERE {where}", params)[0])

    def _groups(self, period: Period) -> list[sqlite3.Row]:
        if period not in self._grouped:
            where, params = _pg_where(period)
            self._grouped[period] = self._all(
                "SELECT flow, substr(decided_at, 1, 10) AS day, decisions, language, "
                "notice_version, count(*) AS n, min(decided_at) AS first, "
                f"max(decided_at) AS last FROM calls WHERE {where} "
                "GROUP BY flow, day, decisions, language, notice_version", params)
        return self._grouped[period]

    def withdrawals(self, period: Period) -> list[WithdrawalCount]:
        where, params = _pg_where(period)
        into = _PG_SECONDS.format(a="started_at", b="withdrawn_at")
        rows = self._all(
            "SELECT coalesce(withdrawn_by, 'unknown') AS author, count(*) AS n, "
            f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {into}) AS median "
            f"FROM calls WHERE withdrawn_at IS NOT NULL AND {where} "
            "GROUP BY author ORDER BY author", params)
        return [WithdrawalCount(r["author"], int(r["n"]), float(r["median"])) for r in rows]

    def recordings(self, period: Period) -> RecordingTotals:
        where, params = _pg_where(period)
        span = _PG_SECONDS.format(a="recording_started_at", b="recording_stopped_at")
        row = self._one(
            f"SELECT count(*), coalesce(sum({span}), 0), "
            "count(*) FILTER (WHERE recording_started_at IS NULL "
            "OR recording_stopped_at IS NULL) "
            f"FROM calls WHERE recording_confirmed = 1 AND {where}", params)
        return RecordingTotals(int(row[0]), float(row[1] or 0.0), int(row[2] or 0))

    def verify(self) -> ChainReport:
        """On its own session: the report runs it in a second thread."""
        from consentivr.audit import verify_chain
        from consentivr.consentlog import open_reader

        conn = open_reader(self.settings)
        try:
            return verify_chain(conn)
        finally:
            conn.close()


def open_stats(database: Path, settings: Any = None) -> LogStats:
    """The log's read interface for its backend: the SQLite file, or with the
    settings of a shared log, PostgreSQL."""
    if settings is not None and settings.database_url is not None:
        return PostgresLogStats(settings)
    return SqliteLogStats(database)
