"""Retention: delete recordings past their deadline and redact old log rows.

One purge run, in this order:

1. **Recordings** whose ``recording_until`` has passed, and recordings of rows
   past the log's own retention (the earlier deadline wins), are deleted.
2. **Log rows** older than ``log_retention_days`` lose their personal fields and
   salt; the proof (what was decided, when, on which notice) and the hash chain stay.
3. **Callback numbers** kept in clear are cleared once ``callback_until`` has passed.
4. **Orphans** (files in the recordings dir that no live row refers to) are
   reported, and deleted only with ``delete_orphans`` once older than a grace.

Safety rules (see ``docs/retention.md``):

* only regular files strictly under the recordings dir are deleted, through
  ``consentivr.recordingsdir`` (fd-relative, no symlink followed);
* a file modified within ``grace`` seconds (wall clock) is a call in progress
  and is kept, whatever the rows say;
* the run holds an exclusive lock (``consentivr.purgelog``): two purges never interleave.

Crash safety: before unlinking a batch the run commits one ``pending`` item per
file (intent). After the unlinks, a second transaction marks the rows purged, turns
the items ``done`` and adds to the run's counters. A run killed in between leaves
``pending`` items; the next run (holding the lock, so the old run is dead) settles
them first: a file that is gone was deleted by the old run and is counted there,
once; a file still present is left to the normal pass. Redactions are single
transactions, so they are atomic and idempotent.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consentivr.errors import ConsentivrError, StoreError
from consentivr.purgelog import local_lock, shared_log
from consentivr.recordingsdir import RecordingsDir, RecordingsUnavailable, UnsafePath, show_path
from consentivr.store import PERSONAL_FIELDS, iso

DAY = 86400.0
DEFAULT_GRACE = 300.0  # a file written within 5 minutes belongs to a live call
DEFAULT_ORPHAN_GRACE = 7 * DAY
DEFAULT_BATCH = 5000

_COUNTERS = (
    "recordings_deleted", "recordings_missing", "rows_redacted", "callers_cleared",
    "orphans_found", "orphans_deleted", "in_progress", "refused",
)

_REDACT_SET = ", ".join(f"{f}=NULL" for f in PERSONAL_FIELDS)


# A run refuses (changes nothing more, exit 1) when at least MISSING_MIN of the
# recordings it is due to delete are missing and they are at least MISSING_SHARE
# of those checked: that is an unmounted volume, not a few lost files. An empty
# recordings dir while recordings are due is refused at the first missing one.
# ``--allow-missing`` overrides both, after the admin has checked.
MISSING_MIN = 10
MISSING_SHARE = 0.5


def parse_as_of(text: str) -> float:
    """``2025-03-01``, ``2025-03-01T12:00:00``, with ``Z`` or an offset; naive is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConsentivrError(
            f"--as-of {text!r}: expected an ISO date or date-time, e.g. 2025-03-01T12:00:00Z"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()



# --- the report -----------------------------------------------------------------


@dataclass
class PurgeReport:
    """What one run did (or, dry, would do). ``items`` are (action, seq, path)."""

    run_id: int | None
    as_of: float
    dry_run: bool
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    items: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    recovered: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "as_of": iso(self.as_of),
            "dry_run": self.dry_run,
            "counts": dict(self.counts),
            "recovered_from_interrupted_run": self.recovered,
            "items": [{"action": a, "seq": s, "path": p} for a, s, p in self.items],
            "warnings": list(self.warnings),
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class PurgeOptions:
    as_of: float
    log_retention_days: int
    dry_run: bool = False
    grace: float = DEFAULT_GRACE
    delete_orphans: bool = False
    orphan_grace: float = DEFAULT_ORPHAN_GRACE
    batch_size: int = DEFAULT_BATCH


Progress = Callable[[int], None]


# --- the purge ------------------------------------------------------------------


@dataclass
class _Batch:
    """One page of recordings on its way: checked, intended, unlinked, marked."""

    stamp: str
    delete: list[tuple[int, tuple[str, ...], str]] = field(default_factory=list)
    missing: list[tuple[int, str]] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)
    deleted: list[tuple[int, str, int]] = field(default_factory=list)
    failed: list[tuple[int, str, int, str]] = field(default_factory=list)


class Purger:
    """Runs purges and erasures against one consent log and recordings dir."""

    def __init__(self, conn: sqlite3.Connection, recordings: RecordingsDir,
                 clock: Callable[[], float] = time.time, allow_missing: bool = False,
                 node: str | None = None, reader: Callable[[], Any] | None = None) -> None:
        self.conn = conn
        # A shared (PostgreSQL) log: this node's name. Recordings are deleted only for
        # rows this node wrote (the files are on its disk); another node's row keeps
        # its personal fields until that node has purged its recording.
        self.node = node
        self._reader = reader
        self.rec = recordings
        self.clock = clock  # wall clock: the in-progress and orphan graces use it
        self.allow_missing = allow_missing
        self._expected = 0  # due recordings checked that should have a file
        self._missing = 0  # ... and were not there

    # -- runs --------------------------------------------------------------

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return _transaction(self.conn)

    def start_run(self, kind: str, as_of: float, dry_run: bool) -> int:
        with self._tx():
            if self.node is None:
                cur = self.conn.execute(
                    "INSERT INTO purge_runs (kind, started_at, as_of, dry_run, status) "
                    "VALUES (?, ?, ?, ?, 'running')",
                    (kind, iso(self.clock()), iso(as_of), int(dry_run)),
                )
            else:
                cur = self.conn.execute(
                    "INSERT INTO purge_runs (kind, started_at, as_of, dry_run, status, node) "
                    "VALUES (?, ?, ?, ?, 'running', ?)",
                    (kind, iso(self.clock()), iso(as_of), int(dry_run), self.node),
                )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def finish_run(self, report: PurgeReport, status: str | None = None) -> None:
        head = self.conn.execute(
            "SELECT seq, row_hash FROM calls ORDER BY seq DESC LIMIT 1").fetchone()
        summary = {"warnings": len(report.warnings), "problems": report.problems[:100],
                   "recovered_from_interrupted_run": report.recovered}
        with self._tx():
            sets = ", ".join(f"{c}=?" for c in ("orphans_found", "in_progress", "refused"))
            self.conn.execute(
                f"UPDATE purge_runs SET finished_at=?, status=?, head_seq=?, head_hash=?, "
                f"summary=?, {sets} WHERE id=?",
                (iso(self.clock()), status or ("problems" if report.problems else "done"),
                 head["seq"] if head else None, head["row_hash"] if head else None,
                 json.dumps(summary), report.counts["orphans_found"],
                 report.counts["in_progress"], report.counts["refused"], report.run_id),
            )
            if report.dry_run:
                # A dry run's counters say what would have gone.
                sets = ", ".join(f"{c}=?" for c in _COUNTERS[:4])
                self.conn.execute(
                    f"UPDATE purge_runs SET {sets}, orphans_deleted=? WHERE id=?",
                    (*(report.counts[c] for c in _COUNTERS[:4]),
                     report.counts["orphans_deleted"], report.run_id),
                )

    # -- recovery ------------------------------------------------------------

    def recover(self, report: PurgeReport) -> None:
        """Settle the pending items a killed run left; count each in its own run."""
        # Another node's pending items name files on its disk: it settles them.
        own = "" if self.node is None else \
            " AND i.run_id IN (SELECT id FROM purge_runs WHERE node = ?)"
        pending = self.conn.execute(
            "SELECT i.id, i.run_id, i.seq, i.action, i.path, c.recording_path "
            "FROM purge_items i LEFT JOIN calls c ON c.seq = i.seq "
            "WHERE i.state = 'pending'" + own, () if self.node is None else (self.node,)
        ).fetchall()
        if not pending:
            self._close_dead_runs()
            return
        now = iso(self.clock())
        gone: list[sqlite3.Row] = []
        still_there: list[int] = []
        for item in pending:
            path = item["path"] if item["seq"] is None else item["recording_path"]
            if path is None:
                gone.append(item)  # the row was redacted since: nothing left to check
                continue
            try:
                self.rec.lstat(self.rec.relative(path))
                still_there.append(item["id"])
            except FileNotFoundError:
                gone.append(item)
            except (OSError, UnsafePath):
                still_there.append(item["id"])
        with self._tx():
            for item in gone:
                counter = ("orphans_deleted" if item["action"] == "orphan_deleted"
                           else "recordings_deleted")
                if item["seq"] is not None:
                    self.conn.execute(
                        "UPDATE calls SET recording_purged_at=? WHERE seq=? "
                        "AND recording_purged_at IS NULL", (now, item["seq"]))
                self.conn.execute("UPDATE purge_items SET state='done' WHERE id=?",
                                  (item["id"],))
                self.conn.execute(
                    f"UPDATE purge_runs SET {counter}={counter}+1 WHERE id=?",
                    (item["run_id"],))
            # Not deleted before the kill: the normal pass decides afresh.
            self.conn.executemany("DELETE FROM purge_items WHERE id=?",
                                  [(i,) for i in still_there])
        report.recovered = len(gone)
        self._close_dead_runs()

    def _close_dead_runs(self) -> None:
        with self._tx():
            self.conn.execute(
                "UPDATE purge_runs SET status='interrupted' WHERE status='running' AND id != ?",
                (self._current_run,))

    _current_run: int = -1

    # -- recordings -----------------------------------------------------------

    def _due(self, query: tuple[str, str], bound: str,
             batch: int) -> Iterator[list[sqlite3.Row]]:
        """Keyset pages in index order, so rows left alone are not seen again.

        Pages start small and double up to ``batch``: the first unlinks begin at once.
        """
        sql, key = query
        mine: tuple[str, ...] = ()
        if self.node is not None and query in _OWN_FILES:
            sql, mine = sql + _OWN_FILES[query], (self.node,)
        last: tuple[str, int] = ("", 0)
        size = min(batch, 250)
        while True:
            rows = self.conn.execute(
                f"{sql} AND {key} <= ? AND ({key}, seq) > (?, ?) ORDER BY {key}, seq LIMIT ?",
                (*mine, bound, *last, size)).fetchall()
            if not rows:
                return
            last = (rows[-1][key], rows[-1]["seq"])
            size = min(batch, size * 2)
            yield rows

    def purge_recordings(self, rows: Sequence[sqlite3.Row], report: PurgeReport,
                         dry_run: bool, grace: float | None) -> list[int]:
        """Delete these rows' recordings; returns the seqs now without a recording.

        ``grace`` None means no in-progress check (never used by the purge).
        """
        batch = self._plan(rows, report, grace)
        if dry_run:
            return self._dry(batch, report)
        self._intent(batch, report)
        self._unlink_all(batch)
        return self._complete(batch, report)

    def _plan(self, rows: Sequence[sqlite3.Row], report: PurgeReport,
              grace: float | None) -> _Batch:
        """Check each file (lstat, never following a link): delete, missing or leave."""
        now = self.clock()
        batch = _Batch(stamp=iso(now))
        inodes: dict[int, int] = {}
        for row in rows:
            seq, path = row["seq"], row["recording_path"]
            try:
                parts = self.rec.relative(path)
                st = self.rec.lstat(parts)
            except FileNotFoundError:
                batch.missing.append((seq, path))
                continue
            except UnsafePath as exc:
                self._refuse(report, seq, path, str(exc))
                continue
            except OSError as exc:
                self._refuse(report, seq, path, exc.strerror or str(exc))
                continue
            if not stat.S_ISREG(st.st_mode):
                self._refuse(report, seq, path, "not a regular file (symlink?)")
                continue
            if grace is not None and st.st_mtime > now - grace:
                report.counts["in_progress"] += 1
                continue
            batch.delete.append((seq, parts, path))
            inodes[seq] = st.st_ino
        # Inode order: neighbouring inodes share disk blocks, so unlinks go faster.
        batch.delete.sort(key=lambda item: inodes[item[0]])
        never = {r["seq"] for r in rows if r["recording_confirmed"] == 0}
        self._check_missing(rows, batch, never)
        for seq, path in batch.missing:
            why = " (MixMonitor never started it)" if seq in never else ""
            report.warnings.append(
                f"seq {seq}: recording {show_path(path)} is missing{why}; row marked purged")
        return batch

    def _check_missing(self, rows: Sequence[sqlite3.Row], batch: _Batch,
                       never: set[int]) -> None:
        """Refuse before marking anything when the missing files look like a lost volume."""
        missing = sum(1 for s, _ in batch.missing if s not in never)
        self._expected += sum(1 for r in rows if r["seq"] not in never)
        self._missing += missing
        if self.allow_missing or not missing:
            return
        self.rec.need_root()
        where = show_path(str(self.rec.root))
        if self.rec.is_empty():
            raise RecordingsUnavailable(
                f"{where} is empty but {self._missing} due recording(s) are missing: a volume "
                "not mounted? Nothing was marked; check, then run with --allow-missing")
        if self._missing >= MISSING_MIN and self._missing >= MISSING_SHARE * self._expected:
            raise RecordingsUnavailable(
                f"{self._missing} of {self._expected} due recordings are missing from {where}: "
                "a volume not mounted? Nothing more was marked; check, then run with "
                "--allow-missing")

    @staticmethod
    def _dry(batch: _Batch, report: PurgeReport) -> list[int]:
        report.counts["recordings_deleted"] += len(batch.delete)
        report.counts["recordings_missing"] += len(batch.missing)
        report.items.extend(("recording_deleted", s, p) for s, _, p in batch.delete)
        report.items.extend(("recording_missing", s, p) for s, p in batch.missing)
        return [s for s, _, _ in batch.delete] + [s for s, _ in batch.missing]

    def _intent(self, batch: _Batch, report: PurgeReport) -> None:
        """Commit one pending item per file before the first unlink (durably)."""
        if not batch.delete:
            return
        with self._tx():
            self.conn.executemany(
                "INSERT INTO purge_items (run_id, seq, action, state, at) "
                "VALUES (?, ?, 'recording_deleted', 'pending', ?)",
                [(report.run_id, s, batch.stamp) for s, _, _ in batch.delete])
            # One writer (BEGIN IMMEDIATE), no AUTOINCREMENT gaps: the ids are contiguous.
            last = self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            batch.item_ids = list(range(last - len(batch.delete) + 1, last + 1))
            first = self.conn.execute("SELECT seq FROM purge_items WHERE id=?",
                                      (batch.item_ids[0],)).fetchone()
            if first is None or first[0] != batch.delete[0][0]:
                raise StoreError("purge log ids are not contiguous")  # never expected

    def _unlink_all(self, batch: _Batch) -> None:
        """The only step that touches files; runs in a worker thread when pipelined."""
        for (seq, parts, path), item_id in zip(batch.delete, batch.item_ids, strict=True):
            try:
                self.rec.unlink(parts)
                batch.deleted.append((seq, path, item_id))
            except FileNotFoundError:
                batch.deleted.append((seq, path, item_id))  # gone meanwhile: purged anyway
            except (OSError, UnsafePath) as exc:
                batch.failed.append((seq, path, item_id, str(exc)))

    def _complete(self, batch: _Batch, report: PurgeReport) -> list[int]:
        """Mark the rows purged, the items done and count them, in one transaction."""
        for seq, path, _, why in batch.failed:
            self._refuse(report, seq, path, why)
        done = [s for s, _, _ in batch.deleted] + [s for s, _ in batch.missing]
        if not done and not batch.failed:
            return done
        run_id, stamp = report.run_id, batch.stamp
        with self._tx():
            self.conn.executemany(
                "UPDATE calls SET recording_purged_at=? WHERE seq=?",
                [(stamp, s) for s in sorted(done)])
            self.conn.executemany("UPDATE purge_items SET state='done' WHERE id=?",
                                  [(i,) for _, _, i in batch.deleted])
            self.conn.executemany("DELETE FROM purge_items WHERE id=?",
                                  [(i,) for _, _, i, _ in batch.failed])
            self.conn.executemany(
                "INSERT INTO purge_items (run_id, seq, action, state, at) "
                "VALUES (?, ?, 'recording_missing', 'done', ?)",
                [(run_id, s, stamp) for s, _ in batch.missing])
            self.conn.execute(
                "UPDATE purge_runs SET recordings_deleted=recordings_deleted+?, "
                "recordings_missing=recordings_missing+? WHERE id=?",
                (len(batch.deleted), len(batch.missing), run_id))
        report.counts["recordings_deleted"] += len(batch.deleted)
        report.counts["recordings_missing"] += len(batch.missing)
        report.items.extend(("recording_deleted", s, p) for s, p, _ in batch.deleted)
        report.items.extend(("recording_missing", s, p) for s, p in batch.missing)
        return done

    def purge_recordings_pipelined(self, pages: Iterable[Sequence[sqlite3.Row]],
                                   report: PurgeReport, grace: float,
                                   tick: Progress) -> None:
        """Like :meth:`purge_recordings` page by page, with one page's unlinks in a
        worker thread while the next page is checked and its intent committed.

        The order that crash safety needs still holds for every page: its intent
        is committed before its first unlink, its rows are marked after its last.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unlink") as pool:
            running: tuple[Future[None], _Batch] | None = None
            for rows in pages:
                try:
                    batch = self._plan(rows, report, grace)
                except RecordingsUnavailable:
                    if running is not None:  # the page on its way is finished first
                        running[0].result()
                        self._complete(running[1], report)
                    raise
                self._intent(batch, report)
                previous = running
                if previous is not None:
                    previous[0].result()
                # The next page's unlinks start before this page is marked: the
                # worker never waits on the database.
                running = (pool.submit(self._unlink_all, batch), batch)
                if previous is not None:
                    self._complete(previous[1], report)
                tick(len(rows))
            if running is not None:
                running[0].result()
                self._complete(running[1], report)

    def _refuse(self, report: PurgeReport, seq: int, path: str, why: str) -> None:
        report.counts["refused"] += 1
        report.problems.append(f"seq {seq}: recording {show_path(path)} left alone: {why}")

    # -- rows -----------------------------------------------------------------

    def redact(self, seqs: Sequence[int], report: PurgeReport, dry_run: bool,
               action: str = "redacted") -> None:
        """Remove the personal fields and the salt; the digest keeps the chain whole."""
        if not seqs:
            return
        if not dry_run:
            stamp = iso(self.clock())
            with self._tx():
                self.conn.executemany(
                    f"UPDATE calls SET {_REDACT_SET}, personal_salt=NULL, redacted_at=? "
                    "WHERE seq=? AND redacted_at IS NULL", [(stamp, s) for s in seqs])
                self.conn.executemany(
                    "INSERT INTO purge_items (run_id, seq, action, state, at) "
                    "VALUES (?, ?, ?, 'done', ?)",
                    [(report.run_id, s, action, stamp) for s in seqs])
                self.conn.execute(
                    "UPDATE purge_runs SET rows_redacted=rows_redacted+? WHERE id=?",
                    (len(seqs), report.run_id))
        report.counts["rows_redacted"] += len(seqs)
        report.items.extend((action, s, None) for s in seqs)

    def clear_callers(self, seqs: Sequence[int], report: PurgeReport, dry_run: bool) -> None:
        """Drop the clear number after the callback purpose ends.

        The salt goes too: with the salt and the other fields, the digest would let
        anyone guess a phone number back (few digits, cheap to try).
        """
        if not seqs:
            return
        if not dry_run:
            stamp = iso(self.clock())
            with self._tx():
                self.conn.executemany(
                    "UPDATE calls SET caller_number=NULL, personal_salt=NULL WHERE seq=?",
                    [(s,) for s in seqs])
                self.conn.executemany(
                    "INSERT INTO purge_items (run_id, seq, action, state, at) "
                    "VALUES (?, ?, 'caller_cleared', 'done', ?)",
                    [(report.run_id, s, stamp) for s in seqs])
                self.conn.execute(
                    "UPDATE purge_runs SET callers_cleared=callers_cleared+? WHERE id=?",
                    (len(seqs), report.run_id))
        report.counts["callers_cleared"] += len(seqs)
        report.items.extend(("caller_cleared", s, None) for s in seqs)

    # -- orphans ---------------------------------------------------------------

    def orphan_candidates(self, as_of: float | None = None) -> list[str]:
        """Files under the dir that no row holds, sorted.

        A row holds a file when it names it under any spelling of the dir
        (``previous_dirs``), or when the file is named after the row's call id
        (``<call id>.wav``) and the row is unpurged or its recording is still
        within retention (``as_of``): a row whose path was written under an
        old spelling, or marked missing while a volume was away, keeps its file.

        Runs in its own thread and connection, alongside the recordings pass: the
        files that pass deletes are named by their rows, so they are never
        candidates, whether they are still there or not.
        """
        known: set[str] = set()  # ~100 bytes a live recording
        call_ids: set[str] = set()
        conn = (self._reader() if self._reader is not None
                else sqlite3.connect(f"{self._db_file()}?mode=ro", uri=True))
        try:
            for path, call_id in conn.execute(
                "SELECT recording_path, call_id FROM calls INDEXED BY calls_recording_until "
                "WHERE recording_path IS NOT NULL AND recording_purged_at IS NULL"
            ):
                call_ids.add(call_id)
                # '..' and the like match no entry; the call id still may.
                with contextlib.suppress(UnsafePath):
                    known.add("/".join(self.rec.relative(path)))
            if as_of is not None:
                call_ids.update(cid for (cid,) in conn.execute(
                    "SELECT call_id FROM calls WHERE recording_until > ? "
                    "AND recording_purged_at IS NOT NULL", (iso(as_of),)))
        finally:
            conn.close()
        return sorted(rel for rel in set(self.rec.walk()) - known
                      if _call_id_of(rel) not in call_ids)

    def _db_file(self) -> str:
        row = self.conn.execute("PRAGMA database_list").fetchone()
        return Path(row["file"]).resolve().as_uri()

    def orphans(self, report: PurgeReport, opts: PurgeOptions,
                candidates: list[str] | None = None) -> None:
        if candidates is None:
            candidates = self.orphan_candidates(opts.as_of)
        now = self.clock()
        to_delete: list[tuple[tuple[str, ...], str]] = []
        for rel in candidates:
            if not _is_utf8(rel):
                # Not a name Asterisk wrote for us; it cannot go into the purge log as
                # text either. A person should look at it.
                report.counts["orphans_found"] += 1
                report.problems.append(f"orphan {show_path(rel)}: its name is not UTF-8; "
                                       "left alone")
                continue
            parts = tuple(rel.split("/"))
            try:
                st = self.rec.lstat(parts)
            except (OSError, UnsafePath):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks, fifos, sockets: never ours to delete
            report.counts["orphans_found"] += 1
            if opts.delete_orphans and st.st_mtime <= now - opts.orphan_grace:
                to_delete.append((parts, rel))
            else:
                report.warnings.append(f"orphan file {show_path(rel)} (no log row refers to it)")
                report.items.append(("orphan_found", None, rel))
        for start in range(0, len(to_delete), opts.batch_size):
            self._delete_orphans(to_delete[start:start + opts.batch_size], report, opts.dry_run)

    def _delete_orphans(self, batch: list[tuple[tuple[str, ...], str]], report: PurgeReport,
                        dry_run: bool) -> None:
        if dry_run:
            report.counts["orphans_deleted"] += len(batch)
            report.items.extend(("orphan_deleted", None, rel) for _, rel in batch)
            return
        stamp = iso(self.clock())
        with self._tx():
            ids = [self.conn.execute(
                "INSERT INTO purge_items (run_id, action, state, path, at) "
                "VALUES (?, 'orphan_deleted', 'pending', ?, ?)",
                (report.run_id, rel, stamp)).lastrowid for _, rel in batch]
        done: list[int | None] = []
        dropped: list[int | None] = []
        for (parts, rel), item_id in zip(batch, ids, strict=True):
            try:
                self.rec.unlink(parts)
                done.append(item_id)
                report.items.append(("orphan_deleted", None, rel))
            except FileNotFoundError:
                dropped.append(item_id)
            except (OSError, UnsafePath) as exc:
                dropped.append(item_id)
                report.problems.append(f"orphan {show_path(rel)} left alone: {exc}")
        with self._tx():
            self.conn.executemany("UPDATE purge_items SET state='done' WHERE id=?",
                                  [(i,) for i in done])
            self.conn.executemany("DELETE FROM purge_items WHERE id=?", [(i,) for i in dropped])
            self.conn.execute(
                "UPDATE purge_runs SET orphans_deleted=orphans_deleted+? WHERE id=?",
                (len(done), report.run_id))
        report.counts["orphans_deleted"] += len(done)

    def _finish_erasures(self, report: PurgeReport, opts: PurgeOptions) -> None:
        """Shared log: erasures asked for on another node, of rows whose recording
        is on this one. The file goes now, then the row is erased."""
        rows = self.conn.execute(
            "SELECT seq, recording_path, recording_confirmed, recording_purged_at FROM calls "
            "WHERE node = ? AND erase_requested_at IS NOT NULL AND redacted_at IS NULL "
            "ORDER BY seq", (self.node,)).fetchall()
        with_file = [r for r in rows if r["recording_path"] is not None
                     and r["recording_purged_at"] is None]
        freed = set(self.purge_recordings(with_file, report, opts.dry_run, opts.grace))
        kept = {r["seq"] for r in with_file} - freed
        self.redact([r["seq"] for r in rows if r["seq"] not in kept], report, opts.dry_run,
                    action="erased")

    # -- the whole purge -----------------------------------------------------------

    def purge(self, opts: PurgeOptions, progress: Progress | None = None) -> PurgeReport:
        report = PurgeReport(run_id=None, as_of=opts.as_of, dry_run=opts.dry_run)
        report.run_id = self._current_run = self.start_run("purge", opts.as_of, opts.dry_run)
        try:
            self._purge(opts, report, progress)
        except RecordingsUnavailable as exc:
            report.problems.append(str(exc))
            self.finish_run(report, status="refused")
            raise
        self.finish_run(report)
        return report

    def _purge(self, opts: PurgeOptions, report: PurgeReport,
               progress: Progress | None) -> None:
        if not opts.dry_run:
            self.recover(report)
        if self.node is not None:
            self._finish_erasures(report, opts)
        (recordings, as_of), (redactions, cutoff), (callers, _) = _bounds(opts)
        tick = progress or (lambda n: None)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="orphans") as pool:
            scan = pool.submit(self.orphan_candidates, opts.as_of)
            # A dry run changes nothing, so it remembers what it would have purged.
            dry_purged: set[int] = set()
            dry_redacted: set[int] = set()
            # 1. Recordings past their own deadline.
            if opts.dry_run:
                for rows in self._due(recordings, as_of, opts.batch_size):
                    dry_purged.update(self.purge_recordings(rows, report, True, opts.grace))
                    tick(len(rows))
            else:
                self.purge_recordings_pipelined(self._due(recordings, as_of, opts.batch_size),
                                                report, opts.grace, tick)
            # 2. Log rows past the log's retention: their recording goes first (the
            # earlier deadline wins), then their personal fields.
            for rows in self._due(redactions, cutoff, opts.batch_size):
                has_recording = [r for r in rows if r["recording_path"] is not None
                                 and r["recording_purged_at"] is None
                                 and r["seq"] not in dry_purged]
                freed = set(self.purge_recordings(has_recording, report, opts.dry_run,
                                                  opts.grace))
                kept = {r["seq"] for r in has_recording} - freed
                ready = [r["seq"] for r in rows if r["seq"] not in kept]
                self.redact(ready, report, opts.dry_run)
                if opts.dry_run:
                    dry_redacted.update(ready)
                tick(len(rows))
            # 3. Callback numbers past the callback purpose (redaction cleared the rest).
            for rows in self._due(callers, as_of, opts.batch_size):
                self.clear_callers([r["seq"] for r in rows if r["seq"] not in dry_redacted],
                                   report, opts.dry_run)
                tick(len(rows))
            # 4. Orphans, listed meanwhile.
            self.orphans(report, opts, scan.result())


def _call_id_of(rel: str) -> str:
    """The call id a recording file is named after: ``<dir>/<call id>.wav`` -> call id."""
    return rel.rsplit("/", 1)[-1].split(".", 1)[0]


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# (query, key column): each walks its own index in key order.
_DUE_RECORDINGS = (
    "SELECT seq, recording_path, recording_confirmed, recording_until FROM calls "
    "INDEXED BY calls_recording_until "
    "WHERE recording_path IS NOT NULL AND recording_purged_at IS NULL",
    "recording_until",
)
_DUE_REDACTIONS = (
    "SELECT seq, recording_path, recording_confirmed, recording_purged_at, decided_at "
    "FROM calls "
    "INDEXED BY calls_decided_at WHERE redacted_at IS NULL",
    "decided_at",
)
_DUE_CALLERS = (
    "SELECT seq, callback_until FROM calls INDEXED BY calls_callback_until "
    "WHERE caller_number IS NOT NULL",
    "callback_until",
)


# On a shared log, the clause that keeps a node to the recordings on its own disk:
# it deletes only its rows' files, and redacts another node's row only once that
# node has purged the row's recording (or there was none).
_OWN_FILES = {
    _DUE_RECORDINGS: " AND node = ?",
    _DUE_REDACTIONS: " AND (node = ? OR recording_path IS NULL "
                     "OR recording_purged_at IS NOT NULL)",
}


def _bounds(opts: PurgeOptions) -> list[tuple[tuple[str, str], str]]:
    as_of = iso(opts.as_of)
    cutoff = iso(opts.as_of - opts.log_retention_days * DAY)
    return [(_DUE_RECORDINGS, as_of), (_DUE_REDACTIONS, cutoff), (_DUE_CALLERS, as_of)]


def count_due(conn: sqlite3.Connection, opts: PurgeOptions) -> int:
    """How many rows a purge will look at (the progress bar's length)."""
    n = 0
    for (sql, key), bound in _bounds(opts):
        where = sql.split(" WHERE ", 1)[1]
        n += conn.execute(f"SELECT count(*) FROM calls WHERE {where} AND {key} <= ?",
                          (bound,)).fetchone()[0]
    return int(n)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write the consent log: {exc}") from exc
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write the consent log: {exc}") from exc


def run_purge(database: Path, recordings_dir: Path, opts: PurgeOptions,
              progress: Progress | None = None, previous_dirs: Sequence[str] = (),
              allow_missing: bool = False, shared: Any = None) -> PurgeReport:
    """Take the lock, open the log and the recordings dir, and purge.

    ``shared``: the settings of a node on a shared PostgreSQL log; the run then
    holds the log's purge lock across all nodes too, and purges this node's files.
    Raises :class:`RecordingsUnavailable` (nothing marked) when the dir cannot be
    opened or looks unmounted, unless ``allow_missing``.
    """
    with local_lock(shared, database), shared_log(shared, database) as (conn, node, reader), \
            RecordingsDir(recordings_dir, previous_dirs) as rec:
        purger = Purger(conn, rec, allow_missing=allow_missing, node=node, reader=reader)
        try:
            return purger.purge(opts, progress)
        except sqlite3.Error as exc:
            raise StoreError(f"{database}: purge failed: {exc}") from exc


def seqs_of(items: Iterable[tuple[str, int | None, str | None]], action: str) -> list[int]:
    return [s for a, s, _ in items if a == action and s is not None]
