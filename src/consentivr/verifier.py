"""The hash-chain check of :mod:`consentivr.audit`, fast enough for a report over 1M rows.

Same rules, same result (:class:`~consentivr.audit.ChainReport`) as
:func:`~consentivr.audit.verify_chain`, two changes for speed:

* **Segments in parallel.** Every row stores its ``prev_hash``, so a range of rows
  can be checked on its own, starting from the stored hash of the row before it;
  that stored hash is itself checked by the range before. The ranges run in
  separate processes (one per core) and are joined in order: the first problem
  wins, as in the sequential walk.
* **A fast path per row.** SQLite writes the canonical JSON of the proof and the
  personal fields (``json_object`` with sorted keys: the same bytes as
  ``store.canonical``), Python only hashes it. Any row the fast path does not
  accept is checked again by :mod:`consentivr.audit`'s own rule, which names the
  problem. A text SQLite encoded differently from Python would only hash
  differently and take that slow path: the fast path can be slower, never more
  lenient.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consentivr.audit import ChainReport, anchored_report, chain_anchors, row_problem
from consentivr.store import GENESIS, PERSONAL_FIELDS, PROOF_FIELDS

# Below this many rows, one segment in this process: starting workers costs more.
PARALLEL_FROM = 100_000


def _object(keys: tuple[str, ...]) -> str:
    """SQL for the canonical JSON of these columns: sorted keys, no spaces."""
    return "json_object(" + ", ".join(f"'{k}', {k}" for k in sorted(keys)) + ")"


# SQLite writes the two canonical JSON texts; Python only hashes them.
_FAST = (
    "SELECT seq, prev_hash, row_hash, personal_salt, personal_digest, "
    "redacted_at IS NOT NULL, callback_until IS NOT NULL AND caller_number IS NULL, "
    f"coalesce({', '.join(PERSONAL_FIELDS)}) IS NOT NULL, "
    f"{_object(PROOF_FIELDS)}, {_object(PERSONAL_FIELDS)} "
    "FROM calls WHERE seq >= ? AND seq < ? ORDER BY seq"
)


def _fast_ok(t: tuple[Any, ...], expected_prev: str, expected_seq: int) -> bool:
    """True if the row verifies; False means: ask the reference rule."""
    seq, prev, row_hash, salt, digest, redacted, cleared, personal, proof_json, personal_json = t
    if prev != expected_prev or seq != expected_seq or type(digest) is not str:
        return False
    if salt is not None:
        if type(salt) is not str:
            return False
        if hashlib.sha256((salt + personal_json).encode()).hexdigest() != digest:
            return False
    elif (not redacted and not cleared) or (redacted and personal):
        return False
    return hashlib.sha256((prev + proof_json + digest).encode()).hexdigest() == row_hash


@dataclass
class Segment:
    """What one range of rows showed: counts, its last good row, hashes at anchors."""

    rows: int = 0
    redacted: int = 0
    head_seq: int | None = None
    last_hash: str | None = None  # the hash of its last good row
    at_anchors: dict[int, str] = field(default_factory=dict)
    bad_seq: int | None = None
    bad_call_id: str | None = None
    problem: str | None = None


def check_segment(database: str, lo: int, hi: int, anchors: frozenset[int]) -> Segment:
    """Rows with ``lo <= seq < hi``, from the stored hash of the row before ``lo``."""
    conn = sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True)
    try:
        before = conn.execute("SELECT seq, row_hash FROM calls WHERE seq < ? "
                              "ORDER BY seq DESC LIMIT 1", (lo,)).fetchone()
        expected_prev, expected_seq = (before[1], before[0] + 1) if before else (GENESIS, 1)
        seg = Segment()
        cur = conn.execute(_FAST, (lo, hi))
        while page := cur.fetchmany(5000):
            for t in page:
                if not _fast_ok(t, expected_prev, expected_seq):
                    full = conn.execute("SELECT * FROM calls WHERE seq = ?", (t[0],))
                    row = dict(zip([c[0] for c in full.description], full.fetchone(),
                                   strict=True))
                    problem = row_problem(row, expected_prev, expected_seq)
                    if problem is not None:
                        seg.last_hash = expected_prev  # as the sequential walk reports it
                        seg.bad_seq, seg.bad_call_id = row["seq"], row["call_id"]
                        seg.problem = problem
                        return seg
                seg.rows += 1
                seg.redacted += bool(t[5])
                expected_prev, expected_seq = t[2], t[0] + 1
                seg.head_seq = t[0]
                if seg.head_seq in anchors:
                    seg.at_anchors[seg.head_seq] = expected_prev
        seg.last_hash = expected_prev if seg.rows else None
        return seg
    finally:
        conn.close()


def verify_log(database: Path, workers: int | None = None,
               parallel_from: int = PARALLEL_FROM) -> ChainReport:
    """The whole chain, in ``workers`` processes (default: one per core)."""
    conn = sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        first, last, count = conn.execute("SELECT min(seq), max(seq), count(*) FROM calls") \
            .fetchone()
        anchors = chain_anchors(conn)
    finally:
        conn.close()
    marks = frozenset(anchors)
    n = max(1, min(workers or os.cpu_count() or 1, 8))
    if first is None or count < parallel_from or n == 1:
        segments = [check_segment(str(database), 0, (last or 0) + 1, marks)]
    else:
        step = (last - first) // n + 1
        bounds = [(first + i * step, first + (i + 1) * step) for i in range(n)]
        try:
            # spawn: the caller may have threads running; a forked copy of them is unsafe.
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) \
                    as pool:
                jobs = [pool.submit(check_segment, str(database), lo, hi, marks)
                        for lo, hi in bounds]
                segments = [job.result() for job in jobs]
        except (BrokenProcessPool, OSError):
            # No workers here (e.g. a __main__ that cannot be imported again): same
            # check, one segment, in this process.
            segments = [check_segment(str(database), 0, last + 1, marks)]
    return _join(segments, anchors)


def _join(segments: list[Segment], anchors: dict[int, tuple[int, str]]) -> ChainReport:
    rows = redacted = 0
    head_seq: int | None = None
    head_hash: str | None = None
    at_anchors: dict[int, str] = {}
    for seg in segments:
        rows += seg.rows
        redacted += seg.redacted
        if seg.head_seq is not None:
            head_seq, head_hash = seg.head_seq, seg.last_hash
        at_anchors.update(seg.at_anchors)
        if seg.problem is not None:
            return ChainReport(rows, head_seq, seg.last_hash, redacted,
                               bad_seq=seg.bad_seq, bad_call_id=seg.bad_call_id,
                               problem=seg.problem)
    return anchored_report(ChainReport(rows, head_seq, head_hash, redacted), anchors, at_anchors)
