"""GroupCommitter: a batch of concurrent writes shares one transaction (one fsync),
and one failing write fails only its own caller."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from consentivr.audit import verify_chain
from consentivr.errors import StoreError
from consentivr.store import CallerKey, ConsentLog, GroupCommitter
from tests.rights_fixtures import CountsCommits, record

KEY = CallerKey(b"k")


class GatedLog(CountsCommits):
    """A consent log whose ``hold`` write blocks the writer until released, so that
    the writes submitted meanwhile queue up and form one batch; it counts COMMITs."""

    def __init__(self, path: Path, entered: threading.Event, release: threading.Event) -> None:
        super().__init__(path, KEY)
        self.entered, self.release = entered, release
        self.fail_commit = False
        self.count_commits()

    def hold(self) -> None:
        self.entered.set()
        self.release.wait(10)

    def legacy_write(self, call_id: str) -> None:
        """A write that opens its own transaction: it cannot join a batch's."""
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("UPDATE calls SET withdrawn_by='legacy' WHERE call_id=?", (call_id,))
        self.conn.execute("COMMIT")

    def broken_write(self) -> None:
        self.conn.execute("UPDATE no_such_table SET x=1")

    def committing_write(self, call_id: str) -> None:
        """The old ``with self.conn:`` style: its exit commits whatever is open."""
        with self.conn:
            self.conn.execute("UPDATE calls SET withdrawn_by='commits' WHERE call_id=?",
                              (call_id,))

    def refuse_commit(self) -> None:
        """Make this batch's COMMIT fail, as a failing disk would (once)."""
        self.fail_commit = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        outermost = not self.conn.in_transaction
        with super().transaction():
            yield
            if outermost and self.fail_commit:
                self.fail_commit = False
                raise sqlite3.OperationalError("disk I/O error")


@pytest.fixture
def gated(tmp_path: Path) -> Any:
    entered, release = threading.Event(), threading.Event()
    logs: list[GatedLog] = []

    def factory() -> GatedLog:
        logs.append(GatedLog(tmp_path / "consent.db", entered, release))
        return logs[0]

    committer = GroupCommitter(factory)

    def batch(items: list[tuple[str, Any]]) -> tuple[list[Future[None]], int]:
        """Submit ``items`` while the writer is held; return their futures and COMMITs."""
        entered.clear()
        release.clear()
        hold = committer.submit("hold", ())
        assert entered.wait(10)
        before = logs[0].commits
        futures = [committer.submit(kind, payload) for kind, payload in items]
        release.set()
        hold.result(10)
        for fut in futures:
            fut.exception(10)  # wait, whatever the outcome
        return futures, logs[0].commits - before

    yield batch
    committer.close()


def rows(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM calls ORDER BY seq"))
    finally:
        conn.close()


@pytest.mark.parametrize("calls", [1, 5, 40])
def test_appends_and_marks_of_concurrent_calls_share_one_commit(
    gated: Any, tmp_path: Path, calls: int,
) -> None:
    first = [record(n) for n in range(calls)]
    futures, _ = gated([("append", r) for r in first])
    assert all(f.exception() is None for f in futures)

    # Marks for the calls above and the decisions of new calls, all at once.
    later = [record(n) for n in range(calls, 2 * calls)]
    items = [("mark_recording", (r.call_id, True, None, 1.0)) for r in first]
    items += [("append", r) for r in later]
    futures, commits = gated(items)

    assert all(f.exception() is None for f in futures)
    # The held write's batch, then one for everything queued behind it.
    assert commits == 2
    logged = rows(tmp_path / "consent.db")
    assert [r["call_id"] for r in logged] == [r.call_id for r in first + later]
    assert [r["recording_confirmed"] for r in logged] == [1] * calls + [None] * calls
    conn = sqlite3.connect(tmp_path / "consent.db")
    conn.row_factory = sqlite3.Row
    try:
        assert verify_chain(conn).ok
    finally:
        conn.close()


@pytest.mark.parametrize("bad", [
    ("broken_write", ()),  # an SQL error inside the batch
    ("mark_recording", ("too", "few")),  # a programming error
    ("no_such_write", ()),  # an unknown kind
])
def test_a_failing_write_fails_only_its_own_caller(
    gated: Any, tmp_path: Path, bad: tuple[str, Any],
) -> None:
    a, b = record(1), record(2)
    futures, _ = gated([("append", a)])
    futures, _ = gated([("mark_recording", (a.call_id, True, None, 1.0)), bad, ("append", b)])
    mark, failed, append = futures
    assert mark.exception() is None and append.exception() is None
    assert failed.exception() is not None
    logged = rows(tmp_path / "consent.db")
    assert [r["call_id"] for r in logged] == [a.call_id, b.call_id]
    assert logged[0]["recording_confirmed"] == 1


def test_a_write_that_opens_its_own_transaction_still_works(
    gated: Any, tmp_path: Path,
) -> None:
    a = record(1)
    gated([("append", a)])
    futures, _ = gated([("legacy_write", (a.call_id,)), ("append", record(2))])
    assert all(f.exception() is None for f in futures)
    assert rows(tmp_path / "consent.db")[0]["withdrawn_by"] == "legacy"


def test_a_write_that_commits_by_itself_does_not_fail_the_rest(
    gated: Any, tmp_path: Path,
) -> None:
    a, b, c = record(1), record(2), record(3)
    gated([("append", a)])
    futures, _ = gated([("append", b), ("committing_write", (a.call_id,)),
                        ("mark_recording", (a.call_id, True, None, 1.0)), ("append", c)])
    assert [f.exception() for f in futures] == [None] * 4
    logged = rows(tmp_path / "consent.db")
    assert [r["call_id"] for r in logged] == [a.call_id, b.call_id, c.call_id]
    assert (logged[0]["withdrawn_by"], logged[0]["recording_confirmed"]) == ("commits", 1)


def test_a_failed_commit_fails_every_write_of_the_batch_and_nothing_is_kept(
    gated: Any, tmp_path: Path,
) -> None:
    a = record(1)
    gated([("append", a)])
    futures, _ = gated([("append", record(2)), ("refuse_commit", ()),
                        ("mark_recording", (a.call_id, True, None, 1.0))])
    assert all(isinstance(f.exception(), StoreError) for f in futures)
    assert "disk I/O error" in str(futures[0].exception())
    logged = rows(tmp_path / "consent.db")
    assert [r["call_id"] for r in logged] == [a.call_id]
    assert logged[0]["recording_confirmed"] is None


def test_a_late_committed_consent_is_voided_and_the_chain_still_verifies(tmp_path: Path) -> None:
    log = ConsentLog(tmp_path / "c.db", CallerKey(b"k"))
    rec = record(1, recording=str(tmp_path / "c1.wav"), callback=True)
    log.append(rec)
    assert log.call(rec.call_id)["caller_number"] == "+31201234567"  # type: ignore[index]
    log.void_late_consent(rec.call_id, "decision committed after the call went on", 1.0e9)
    row = log.call(rec.call_id)
    assert row is not None
    assert row["caller_number"] is None and row["withdrawn_by"] == "system"
    assert row["recording_confirmed"] == 0
    conn = sqlite3.connect(tmp_path / "c.db")
    conn.row_factory = sqlite3.Row
    assert verify_chain(conn).ok
    log.close()


def test_a_cancelled_write_does_not_stop_the_writer(tmp_path: Path) -> None:
    committer = GroupCommitter(lambda: ConsentLog(tmp_path / "c.db", CallerKey(b"k")))
    try:
        first = committer.submit("append", record(1))
        first.cancel()  # a caller that gave up waiting
        later = committer.submit("append", record(2))
        later.result(timeout=10)  # the writer is alive and took the next write
    finally:
        committer.close()
    assert [r["call_id"] for r in rows(tmp_path / "c.db")] in (["c1", "c2"], ["c2"])
