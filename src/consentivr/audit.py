"""Checking the consent log's hash chain (``consentivr verify``).

Each row stores ``row_hash = sha256(prev_hash, proof fields, personal_digest)``
(see :mod:`consentivr.store`). A row is checked in three steps:

1. its ``prev_hash`` must be the previous row's ``row_hash`` (``GENESIS`` for the
   first row) and its ``seq`` the previous one plus one: this proves order and
   completeness, so a deleted, inserted or reordered row breaks here;
2. its ``personal_digest`` is recomputed from the personal fields and the salt
   when the salt is still there. Without the salt (a redacted row, or a row whose
   callback number was cleared) the stored digest is used: the personal fields
   are gone or partly gone, and the chain still binds the digest;
3. ``row_hash`` is recomputed from ``prev_hash``, the proof fields and the digest.

Deleting the *last* rows leaves no successor to notice. Every purge and erasure
stores the chain head it saw (``purge_runs.head_seq/head_hash``); those anchors
are checked too, and ``verify`` prints the current head for the DPO to note.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from consentivr.store import GENESIS, PERSONAL_FIELDS, chain_hash, personal_digest


@dataclass(frozen=True)
class ChainReport:
    rows: int
    head_seq: int | None
    head_hash: str | None
    redacted: int
    bad_seq: int | None = None
    bad_call_id: str | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rows": self.rows, "redacted": self.redacted,
            "head_seq": self.head_seq, "head_hash": self.head_hash,
            "bad_seq": self.bad_seq, "bad_call_id": self.bad_call_id, "problem": self.problem,
        }


def row_problem(row: dict[str, Any], expected_prev: str, expected_seq: int) -> str | None:
    """What is wrong with this row after its predecessor (None: nothing); the reference
    rule, also :mod:`consentivr.verifier`'s answer for a row its fast path refuses."""
    seq = row["seq"]
    if row["prev_hash"] != expected_prev:
        if seq != expected_seq:
            return (f"rows are missing before it (expected seq {expected_seq}): "
                    "a row was deleted or the rows were renumbered")
        return "prev_hash is not the previous row's hash: a row was deleted, inserted or moved"
    if seq != expected_seq:
        return f"seq jumps from {expected_seq - 1} to {seq}: rows were renumbered"
    salt = row["personal_salt"]
    if salt is not None:
        digest = personal_digest(row, salt)
        if digest != row["personal_digest"]:
            return "personal fields do not match their digest: the row was edited"
    else:
        cleared_number = (row["callback_until"] is not None and row["caller_number"] is None)
        if row["redacted_at"] is None and not cleared_number:
            return "the salt was removed from a row that was never redacted"
        if row["redacted_at"] is not None and any(row[k] is not None for k in PERSONAL_FIELDS):
            return "a redacted row holds personal fields again"
        digest = row["personal_digest"]
    if chain_hash(row["prev_hash"], row, digest) != row["row_hash"]:
        return "row_hash does not match the row: the row was edited"
    return None


def verify_chain(conn: sqlite3.Connection,
                 progress: Callable[[int], None] | None = None) -> ChainReport:
    """Walk the whole log in ``seq`` order; stop at the first bad row."""
    expected_prev, expected_seq = GENESIS, 1
    rows = redacted = 0
    head_seq: int | None = None
    hashes_at_anchors: dict[int, str] = {}
    anchors = chain_anchors(conn)
    anchor_seqs = set(anchors)
    cur = conn.execute("SELECT * FROM calls ORDER BY seq")
    while True:
        page = cur.fetchmany(5000)
        if not page:
            break
        for raw in page:
            row = dict(raw)
            problem = row_problem(row, expected_prev, expected_seq)
            if problem is not None:
                return ChainReport(rows, head_seq, expected_prev, redacted,
                                   bad_seq=row["seq"], bad_call_id=row["call_id"],
                                   problem=problem)
            rows += 1
            redacted += row["redacted_at"] is not None
            expected_prev, expected_seq = row["row_hash"], row["seq"] + 1
            head_seq = row["seq"]
            if head_seq in anchor_seqs:
                hashes_at_anchors[head_seq] = expected_prev
        if progress is not None:
            progress(len(page))
    head_hash = None if head_seq is None else expected_prev
    return anchored_report(ChainReport(rows, head_seq, head_hash, redacted),
                           anchors, hashes_at_anchors)


def anchored_report(walked: ChainReport, anchors: Mapping[int, tuple[int, str]],
                    seen: Mapping[int, str]) -> ChainReport:
    """``walked`` (a walk that found no bad row) checked against the purge anchors.

    ``anchors`` is :func:`chain_anchors`; ``seen`` maps each anchor seq the walk
    reached to the row_hash it found there. The first anchor that does not hold
    wins, in seq order.
    """
    for seq, (run_id, want) in sorted(anchors.items()):
        got = seen.get(seq)
        if got is None:
            return replace(walked, bad_seq=seq,
                           problem=f"purge run {run_id} saw rows up to seq {seq}: "
                                   "rows at the end of the log were deleted")
        if got != want:
            return replace(walked, bad_seq=seq,
                           problem=f"row seq {seq} differs from what purge run {run_id} "
                                   "saw: the chain was rewritten")
    return walked


def chain_anchors(conn: sqlite3.Connection) -> dict[int, tuple[int, str]]:
    """seq -> (run id, row_hash) for every chain head a purge run recorded."""
    try:
        found = conn.execute(
            "SELECT id, head_seq, head_hash FROM purge_runs WHERE head_seq IS NOT NULL "
            "ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return {}  # no purge has ever run
    return {r["head_seq"]: (r["id"], r["head_hash"]) for r in found}


def count_rows(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])
