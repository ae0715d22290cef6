"""Data-subject rights: access (art. 15), erasure (art. 17) and the callback list.

A caller is found by the HMAC pseudonym of their number (``caller_hash``), and by
the clear number for the rows that still hold one. Any human spelling works
(``06-1111 0002``, ``+31 6 1111 0002``, ``0031611110002``): rows are hashed from
E.164 (see :mod:`consentivr.callers`), and rows written before that, hashed from
whatever the trunk sent, are found by trying the old spellings too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consentivr.callers import callback_number, spellings
from consentivr.errors import ConsentivrError, StoreError
from consentivr.model import Decision, Flow
from consentivr.paths import make_private_dir
from consentivr.purgelog import local_lock, shared_log
from consentivr.recordingsdir import RecordingsDir, RecordingsUnavailable, UnsafePath
from consentivr.retention import DEFAULT_GRACE, Purger, PurgeReport
from consentivr.store import CallerKey, iso, public_row
from consentivr.text import one_line

_SEPARATORS = str.maketrans("", "", " \t.-()/")


def normalise_number(text: str) -> str:
    """The number without separators; refuses text that cannot be a number at all.

    The lookup then tries every spelling of it (:func:`subject_rows`).
    """
    number = text.translate(_SEPARATORS)
    if not number or not number.isprintable() or len(number) > 64:
        raise ConsentivrError(f"--caller {one_line(text)}: expected a phone number, "
                              "e.g. +31201234567 or 020-123 4567")
    return number


# The rights log: one row per answered access request, to count them in the DPO's
# report. Only the kind and the time: nothing that points back to the person.
# (Erasures are counted from their ``erase`` runs in the purge log.)
REQUESTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_requests (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,              -- access
    at TEXT NOT NULL
);
"""


def log_request(conn: sqlite3.Connection, kind: str, at: float) -> None:
    """Count one answered request (``access``) in the rights log."""
    try:
        conn.executescript(REQUESTS_SCHEMA)
        with conn:
            conn.execute("INSERT INTO subject_requests (kind, at) VALUES (?, ?)",
                         (kind, iso(at)))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write the rights log: {exc}") from exc


def subject_rows(conn: sqlite3.Connection, key: CallerKey, number: str) -> list[sqlite3.Row]:
    """Every row about this number, in any spelling it was logged under, oldest first."""
    hashes = key.lookup_hashes(number)
    numbers = spellings(number, key.region)
    marks = ",".join("?" * len(hashes))
    nmarks = ",".join("?" * len(numbers))
    return conn.execute(
        f"SELECT * FROM calls WHERE caller_hash IN ({marks}) OR caller_number IN ({nmarks}) "
        "ORDER BY seq", (*hashes, *numbers),
    ).fetchall()


# --- access -------------------------------------------------------------------


@dataclass
class SubjectExport:
    rows: list[dict[str, Any]]
    recordings: list[str] = field(default_factory=list)  # files written under out/
    missing: list[str] = field(default_factory=list)  # recordings the rows name but not found
    out: Path | None = None

    @property
    def personal(self) -> bool:
        return bool(self.rows or self.recordings)

    def to_json(self) -> dict[str, Any]:
        return {"generated_at": iso(time.time()), "rows": self.rows,
                "recordings": self.recordings, "missing_recordings": self.missing}


def export_subject(conn: sqlite3.Connection, recordings_dir: Path, key: CallerKey,
                   number: str, out: Path | None,
                   previous_dirs: Sequence[str] = ()) -> SubjectExport:
    """Everything held about ``number``; with ``out``, also copies of the recordings."""
    rows = subject_rows(conn, key, number)
    export = SubjectExport(rows=[public_row(r) for r in rows], out=out)
    log_request(conn, "access", time.time())
    if out is None:
        return export
    _make_out_dir(out)
    with RecordingsDir(recordings_dir, previous_dirs) as rec:
        for row in rows:
            path = row["recording_path"]
            if path is None or row["recording_purged_at"] is not None:
                continue
            name = f"{row['seq']}-{os.path.basename(path)}"
            try:
                src = rec.open_regular(rec.relative(path))
            except (OSError, UnsafePath):
                export.missing.append(path)
                continue
            try:
                _copy(src, out / "recordings" / name)
            finally:
                os.close(src)
            export.recordings.append(f"recordings/{name}")
    target = out / "subject.json"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(export.to_json(), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return export


def _make_out_dir(out: Path) -> None:
    """A new 0700 dir; an existing one only if empty, ours and not a symlink (made 0700).

    Personal data must not land where another user can read it or has a link ready.
    """
    shown = one_line(str(out))
    try:
        if os.path.islink(out):
            raise ConsentivrError(f"{shown}: the export dir is a symlink; give a new dir")
        if out.exists():
            st = out.stat()
            if st.st_uid != os.geteuid():
                raise ConsentivrError(f"{shown}: the export dir belongs to another user; "
                                      "give a new one")
            if any(out.iterdir()):
                raise ConsentivrError(f"{shown}: the export dir is not empty; give a new one")
        else:
            make_private_dir(out.parent)
            out.mkdir(mode=0o700)
        os.chmod(out, 0o700)  # whatever the umask or the mode it was given with
        (out / "recordings").mkdir(mode=0o700)
        os.chmod(out / "recordings", 0o700)
    except OSError as exc:
        raise ConsentivrError(f"{shown}: cannot create the export dir: {exc.strerror}") \
            from exc


def _copy(src: int, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while chunk := os.read(src, 1 << 20):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- erasure ---------------------------------------------------------------------


@dataclass
class ErasePlan:
    rows: int
    recordings: int


def erase_plan(conn: sqlite3.Connection, key: CallerKey, number: str) -> ErasePlan:
    rows = subject_rows(conn, key, number)
    recordings = sum(1 for r in rows
                     if r["recording_path"] is not None and r["recording_purged_at"] is None)
    return ErasePlan(rows=len(rows), recordings=recordings)


def erase_subject(database: Path, recordings_dir: Path, key: CallerKey, number: str,
                  grace: float = DEFAULT_GRACE, lock_wait: float = 30.0,
                  previous_dirs: Sequence[str] = (), allow_missing: bool = False,
                  shared: Any = None) -> PurgeReport:
    """Delete the number's recordings and redact its rows, in one erase run.

    The purge log keeps a tombstone: an ``erase`` run with the row numbers it
    erased, and nothing that points back to the person. A recording still being
    written (a call in progress) is left, with its row, and reported as a problem.
    A recordings dir that cannot be opened, or looks unmounted, stops the erasure
    before anything is changed (:class:`RecordingsUnavailable`).

    ``shared``: a node's settings on a shared PostgreSQL log. The rows of every
    node are erased; this node deletes its own recordings now, and the report
    names the ones on other nodes, which their next purge deletes.
    """
    with local_lock(shared, database, wait=lock_wait), \
            shared_log(shared, database, wait=lock_wait) as (conn, node, reader):
        try:
            with RecordingsDir(recordings_dir, previous_dirs) as rec:
                purger = Purger(conn, rec, allow_missing=allow_missing, node=node,
                                reader=reader)
                now = time.time()
                report = PurgeReport(run_id=None, as_of=now, dry_run=False)
                report.run_id = purger._current_run = purger.start_run("erase", now, False)
                rows = subject_rows(conn, key, number)
                with_file = [r for r in rows if r["recording_path"] is not None
                             and r["recording_purged_at"] is None]
                elsewhere = [r for r in with_file if node is not None and r["node"] != node]
                with_file = [r for r in with_file if r not in elsewhere]
                try:
                    if with_file:
                        rec.need_root()
                    purger.recover(report)
                    freed = set(purger.purge_recordings(with_file, report, False, grace))
                except RecordingsUnavailable as exc:
                    report.problems.append(str(exc))
                    purger.finish_run(report, status="refused")
                    raise
                kept = {r["seq"] for r in with_file} - freed
                if elsewhere:
                    # Their rows are erased now except for the path, which the owning
                    # node's next purge needs to find the file.
                    _erase_keeping_path(conn, [r["seq"] for r in elsewhere], report)
                    by_node = sorted({r["node"] for r in elsewhere})
                    report.warnings.append(
                        f"{len(elsewhere)} recording(s) are on other node(s) "
                        f"({', '.join(by_node)}): each is deleted by that node's next purge")
                    kept |= {r["seq"] for r in elsewhere}
                if report.counts["in_progress"]:
                    report.problems.append(
                        f"{report.counts['in_progress']} recording(s) still being written: "
                        "erase again when the call has ended")
                purger.redact([r["seq"] for r in rows if r["seq"] not in kept], report,
                              dry_run=False, action="erased")
                purger.finish_run(report)
                return report
        except sqlite3.Error as exc:
            raise StoreError(f"{database}: erasure failed: {exc}") from exc


def _erase_keeping_path(conn: Any, seqs: list[int], report: PurgeReport) -> None:
    """Rows whose recording is on another node: that node's next purge deletes the
    file and then erases the row (``erase_requested_at``; not part of the chain)."""
    with conn:
        conn.executemany("UPDATE calls SET erase_requested_at=? WHERE seq=? "
                         "AND erase_requested_at IS NULL",
                         [(iso(report.as_of), s) for s in seqs])


# --- the callback list ------------------------------------------------------------------


def callback_list(conn: sqlite3.Connection, flows: Mapping[str, Flow],
                  as_of: float, region: str | None = None) -> list[dict[str, Any]]:
    """Callers who said yes to the callback and are within its retention, latest call each.

    A later call from the same number that did not say yes (or a withdrawal)
    takes the number off the list: the latest decision wins. Numbers are given
    in E.164; a kept number that is not one (a row from before intake checks:
    withheld, garbage, a formula) is never listed.
    """
    rows = conn.execute(
        "SELECT seq, call_id, caller_hash, caller_number, flow, language, decided_at, "
        "callback_until FROM calls INDEXED BY calls_callback_until "
        "WHERE caller_number IS NOT NULL AND callback_until > ? AND redacted_at IS NULL "
        "AND withdrawn_at IS NULL ORDER BY seq",
        (iso(as_of),),
    ).fetchall()
    latest: dict[str, sqlite3.Row] = {}
    for row in rows:
        number = callback_number(row["caller_number"], region)
        if number is not None:
            latest.pop(number, None)  # re-inserted: the dict keeps the latest call's order
            latest[number] = row
    result = []
    for number, row in latest.items():
        if _said_otherwise_later(conn, flows, row):
            continue
        result.append({
            "number": number, "call_id": row["call_id"], "flow": row["flow"],
            "language": row["language"], "decided_at": row["decided_at"],
            "callback_until": row["callback_until"],
        })
    result.sort(key=lambda r: r["decided_at"])
    return result


_ALLOWING = {d.value for d in Decision if d.allows_processing}


def _said_otherwise_later(conn: sqlite3.Connection, flows: Mapping[str, Flow],
                          row: sqlite3.Row) -> bool:
    if row["caller_hash"] is None:
        return False
    later = conn.execute(
        "SELECT flow, decisions, withdrawn_at FROM calls WHERE caller_hash = ? AND seq > ?",
        (row["caller_hash"], row["seq"]),
    ).fetchall()
    for other in later:
        flow = flows.get(other["flow"])
        purpose = flow.callback_purpose if flow is not None else None
        if purpose is None:
            continue  # that flow did not ask about a callback
        answer = json.loads(other["decisions"]).get(purpose.name)
        if answer not in _ALLOWING:
            return True
    return False
