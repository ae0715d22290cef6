"""Recording times through the group committer (issue 17 follow-up, perf2).

The AMI listener's recording start and stop times are *lazy* writes: they wait for
the next batch of decision rows and share its commit (no fsync of their own), go
after the marks they depend on, and are written at once before a withdrawal. A
failing one is logged and counted, never lost silently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consentivr.consentlog import open_consent_log
from consentivr.errors import StoreError
from consentivr.listener import RecordingListener
from consentivr.store import ConsentLog, GroupCommitter, iso, parse_iso
from consentivr.tracker import RecordingBegan, Withdrawn
from tests.rights_fixtures import BACKENDS, CountsCommits, Env, backend_env, record


class CountingLog(CountsCommits):
    """The SQLite log, counting COMMITs; ``fail`` makes recording_started fail."""

    def __init__(self, env: Env, fail: bool = False) -> None:
        super().__init__(env.db, env.key)
        self.fail = fail
        self.count_commits()

    def recording_started(self, uniqueid: str, at: float) -> None:
        if self.fail:
            raise StoreError(f"{self.path}: cannot update the consent log: disk I/O error")
        super().recording_started(uniqueid, at)


@pytest.fixture(params=BACKENDS)
def env(request: Any, tmp_path: Path) -> Env:
    return backend_env(request, tmp_path)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def committer_for(env: Env, linger: float = 60.0, **kw: Any) -> tuple[GroupCommitter, list[Any]]:
    """A committer on ``env``'s backend (a CountingLog on SQLite), and its log."""
    logs: list[Any] = []

    def factory() -> Any:
        log_ = CountingLog(env, **kw) if env.pg_url is None else open_consent_log(env.settings)
        logs.append(log_)
        return log_

    return GroupCommitter(factory, linger=linger), logs


def recorded_calls(committer: GroupCommitter, env: Env, n: int) -> list[str]:
    """``n`` decided calls whose recording is confirmed; their uniqueids."""
    recs = [record(i, recording=str(env.rec / f"c{i}.wav")) for i in range(n)]
    for rec in recs:
        committer.submit("append", rec).result(10)
        committer.submit("mark_recording", (rec.call_id, True, None, 5.0)).result(10)
    return [rec.channel_id for rec in recs]


def times(env: Env) -> dict[str, tuple[str | None, str | None]]:
    conn: Any = sqlite3.connect(env.db) if env.pg_url is None else env.conn()
    try:
        found = conn.execute("SELECT uniqueid, recording_started_at, recording_stopped_at "
                             "FROM calls").fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2]) for r in found}


@pytest.fixture
def closing() -> Iterator[list[GroupCommitter]]:
    made: list[GroupCommitter] = []
    yield made
    for committer in made:
        committer.close()


# --- the committer ---------------------------------------------------------------------


def test_lazy_writes_wait_for_the_next_batch_and_share_its_commit(
        sqlite_env: Env, closing: list[GroupCommitter]) -> None:
    committer, [log_] = committer_for(sqlite_env)
    closing.append(committer)
    a, b = recorded_calls(committer, sqlite_env, 2)
    before = log_.commits
    lazy = [committer.submit("recording_started", (a, 10.0), lazy=True),
            committer.submit("recording_stopped", (b, 20.0), lazy=True)]
    committer.submit("append", record(7)).result(10)  # a decision row: the batch they join
    for fut in lazy:
        assert fut.result(10) is None
    assert log_.commits - before == 1, "the two times took commits of their own"
    got = times(sqlite_env)
    assert got[a] == (iso(10.0), None) and got[b] == (iso(5.0), iso(20.0))


@pytest.mark.parametrize("lazy", [True, False])
def test_a_lazy_write_commits_alone_after_the_linger(sqlite_env: Env,
                                                     closing: list[GroupCommitter],
                                                     lazy: bool) -> None:
    committer, _ = committer_for(sqlite_env, linger=0.2)
    closing.append(committer)
    [a] = recorded_calls(committer, sqlite_env, 1)
    started = time.monotonic()
    committer.submit("recording_started", (a, 10.0), lazy=lazy).result(10)
    waited = time.monotonic() - started
    assert times(sqlite_env)[a][0] == iso(10.0)
    if lazy:
        assert waited >= 0.15, "a lazy write should wait for company first"


def test_lazy_times_go_after_the_mark_they_depend_on(env: Env,
                                                     closing: list[GroupCommitter]) -> None:
    """MixMonitorStart can reach the listener before the driver submits its mark: the
    start time must not be dropped (the UPDATE needs recording_confirmed=1)."""
    committer, _ = committer_for(env)
    closing.append(committer)
    rec = record(1, recording=str(env.rec / "c1.wav"))
    committer.submit("append", rec).result(10)
    started = committer.submit("recording_started", (rec.channel_id, 10.0), lazy=True)
    committer.submit("mark_recording", (rec.call_id, True, None, 5.0)).result(10)
    started.result(10)
    assert times(env)[rec.channel_id] == (iso(10.0), None)


def test_flush_and_close_write_lazy_times_at_once(env: Env) -> None:
    committer, _ = committer_for(env)
    try:
        a, b = recorded_calls(committer, env, 2)
        one = committer.submit("recording_started", (a, 10.0), lazy=True)
        committer.flush().result(10)
        assert one.done() and times(env)[a][0] == iso(10.0)
        two = committer.submit("recording_started", (b, 11.0), lazy=True)
    finally:
        committer.close()
    assert two.done() and two.exception() is None
    assert times(env)[b][0] == iso(11.0)


def test_a_failing_lazy_write_fails_only_itself(sqlite_env: Env,
                                                closing: list[GroupCommitter]) -> None:
    committer, [log_] = committer_for(sqlite_env)
    closing.append(committer)
    a, b = recorded_calls(committer, sqlite_env, 2)
    log_.fail = True
    bad = committer.submit("recording_started", (a, 10.0), lazy=True)
    good = committer.submit("recording_stopped", (b, 20.0), lazy=True)
    committer.submit("append", record(7)).result(10)
    assert isinstance(bad.exception(10), StoreError)
    assert good.result(10) is None and times(sqlite_env)[b][1] == iso(20.0)


# --- the listener ----------------------------------------------------------------------


def event(kind: str, uid: str, **fields: str) -> dict[str, str]:
    return {"Event": kind, "Uniqueid": uid, "Channel": f"Local/{uid}", **fields}


async def _began_both(listener: RecordingListener, uids: list[str]) -> None:
    """Two recorded callers bridged in the same loop turn, through the tracker."""
    for uid in uids:
        listener._on_event(event("MixMonitorStart", uid))
        listener._on_event(event("BridgeEnter", uid, BridgeUniqueid=f"b-{uid}"))
    for uid in uids:
        await listener.wait_for(lambda c, u=uid: isinstance(c, RecordingBegan)
                                and c.uniqueid == u, 10)


def _listener(env: Env, committer: GroupCommitter) -> tuple[RecordingListener, Any]:
    listener = RecordingListener(env.settings, clock=lambda: 1000.0, committer=committer)
    task = asyncio.get_running_loop().create_task(listener._run())
    return listener, task


async def _stop(listener: RecordingListener, task: Any) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await listener.stop()


def test_two_recording_starts_in_one_loop_turn_land_in_one_transaction(
        sqlite_env: Env, closing: list[GroupCommitter]) -> None:
    committer, [log_] = committer_for(sqlite_env)
    closing.append(committer)
    uids = recorded_calls(committer, sqlite_env, 2)

    async def main() -> int:
        listener, task = _listener(sqlite_env, committer)
        before = log_.commits
        await _began_both(listener, uids)
        await asyncio.wrap_future(committer.flush())
        await _stop(listener, task)
        assert listener.time_write_failures == 0
        return log_.commits - before

    assert asyncio.run(main()) == 1
    assert {times(sqlite_env)[u][0] for u in uids} == {iso(1000.0)}


def test_a_failing_recording_time_is_logged_and_counted(
        sqlite_env: Env, closing: list[GroupCommitter],
        caplog: pytest.LogCaptureFixture) -> None:
    committer, [log_] = committer_for(sqlite_env)
    closing.append(committer)
    uids = recorded_calls(committer, sqlite_env, 2)
    log_.fail = True

    async def main() -> int:
        listener, task = _listener(sqlite_env, committer)
        await _began_both(listener, uids)
        await asyncio.wrap_future(committer.flush())
        deadline = time.monotonic() + 10
        while listener.time_write_failures < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # reported from the writer thread
        await _stop(listener, task)
        return listener.time_write_failures

    with caplog.at_level(logging.ERROR, logger="consentivr.listener"):
        assert asyncio.run(main()) == 2
    failed = [r.getMessage() for r in caplog.records if "NOT written" in r.getMessage()]
    assert len(failed) == 2 and all("recording started" in m for m in failed)


def test_a_withdrawal_right_after_the_start_keeps_the_start_time(
        env: Env, closing: list[GroupCommitter]) -> None:
    """The withdrawal sets the stop time; a start time still waiting for its batch
    would then never land (it only fills a recording not stopped yet)."""
    committer, _ = committer_for(env)
    closing.append(committer)
    [uid] = recorded_calls(committer, env, 1)

    async def main() -> None:
        listener, task = _listener(env, committer)
        listener._on_event(event("MixMonitorStart", uid))
        listener._on_event(event("BridgeEnter", uid, BridgeUniqueid="b"))
        await listener.wait_for(lambda c: isinstance(c, RecordingBegan), 10)
        await listener._execute(Withdrawn("c0", uid, "", "caller", 1005.0))
        await _stop(listener, task)

    asyncio.run(main())
    started, stopped = times(env)[uid]
    assert started is not None and stopped is not None
    assert (parse_iso(started), parse_iso(stopped)) == (1000.0, 1005.0)


def test_without_a_committer_the_listener_writes_times_itself(sqlite_env: Env) -> None:
    """A listener on its own (tests, tools) keeps its own connection."""
    seed = GroupCommitter(lambda: ConsentLog(sqlite_env.db, sqlite_env.key))
    try:
        [uid] = recorded_calls(seed, sqlite_env, 1)
    finally:
        seed.close()

    async def main() -> None:
        listener = RecordingListener(sqlite_env.settings, clock=lambda: 1000.0)
        task = asyncio.get_running_loop().create_task(listener._run())
        listener._on_event(event("MixMonitorStart", uid))
        listener._on_event(event("BridgeEnter", uid, BridgeUniqueid="b"))
        await listener.wait_for(lambda c: isinstance(c, RecordingBegan), 10)
        await _stop(listener, task)

    asyncio.run(main())
    assert times(sqlite_env)[uid][0] == iso(1000.0)
