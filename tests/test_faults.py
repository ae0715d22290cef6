"""Each fault on its own (issue 7): reconnect, recovery, fail-closed, security.

The unit tests drive :class:`~consentivr.stasis.StasisApp` with fakes; the integration
tests (``pbx`` fixture) break one thing at a time around the real Asterisk 22: the
events websocket, consentivr itself (a crash mid-call), AMI, the database (locked,
full, read-only) and Asterisk (a restart, on a PBX of its own).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consentivr import redaction
from consentivr.ami import AmiPool, Recorder
from consentivr.ari import AriClient
from consentivr.configfile import load_settings
from consentivr.consentwriter import ConsentWriter
from consentivr.errors import AmiError, AriError, ConfigError, StoreError
from consentivr.flow import Phase
from consentivr.messages import DecisionRecord
from consentivr.model import Decision
from consentivr.recovery import BUDGET, LoggedCall
from consentivr.service import LazyLog, Service, prepare_paths
from consentivr.settings import AmiSettings, AriSettings, Settings
from consentivr.stasis import StasisApp
from consentivr.store import (
    CallerKey,
    ConsentLog,
    GroupCommitter,
    load_or_create_key,
    open_database,
)
from consentivr_testbed.pbx import SandboxPbx
from consentivr_testbed.testbed import (
    CALLER_APP,
    LocalCall,
    Testbed,
    dialplan_for_tests,
    flow_yaml,
)
from tests.fault_fixtures import (
    SECRETS,
    FakeAri,
    FakeCommitter,
    FakeRecorder,
    RestCutProxy,
    TcpProxy,
    committed_yes,
    crash,
    fill_up,
    hold_lock_in_thread,
    record,
    remount,
    rows,
    settings_in,
    small_fs,
    wait_for,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_in(tmp_path)


def stasis_start(channel_id: str, number: str = "+31201234567", flow: str = "main",
                 name: str | None = None) -> dict[str, Any]:
    return {
        "type": "StasisStart", "application": "consentivr", "args": [flow],
        "channel": {"id": channel_id, "name": name or f"PJSIP/alice-{channel_id}",
                    "caller": {"name": "x", "number": number}, "linkedid": channel_id},
    }


def dtmf(channel_id: str, digit: str) -> dict[str, Any]:
    return {"type": "ChannelDtmfReceived", "digit": digit, "channel": {"id": channel_id}}


async def run_call(app: StasisApp, ari: FakeAri, channel_id: str, digits: str,
                   timeout: float = 10) -> None:
    """One fake call: StasisStart, then a digit whenever a question waits."""
    app.handle_event(stasis_start(channel_id))
    for digit in digits:
        await wait_for(lambda: (s := app.sessions.get(channel_id)) is not None
                       and s.machine.phase in (Phase.QUESTION_PROMPT, Phase.QUESTION_WAIT),
                       timeout, "a question")
        before = len(app.sessions[channel_id].machine.keys)
        app.handle_event(dtmf(channel_id, digit))
        await wait_for(lambda n=before: channel_id not in app.sessions
                       or len(app.sessions[channel_id].machine.keys) > n,
                       timeout, "the digit to count")
    await wait_for(lambda: channel_id in ari.continued or channel_id in ari.hung_up,
                   timeout, "the call to leave the app")


def fake_app(settings: Settings, committer: Any = None, recorder: Any = None,
             lookup: Any = None, decision_timeout: float = 6.0) -> tuple[StasisApp, FakeAri]:
    ari = FakeAri()
    writer = ConsentWriter(committer or FakeCommitter(), timeout=decision_timeout)
    app = StasisApp(settings, ari, recorder or FakeRecorder(), writer, lookup=lookup)
    ari.app = app
    return app, ari


# =========================================================================== unit: fail-closed


def test_decision_not_logged_goes_on_unrecorded_then_late_row(settings: Settings) -> None:
    """DB write fails: the call goes on unrecorded, the error is logged, no crash; once
    the log works again the row is written as what was acted on (all error)."""
    committer = FakeCommitter(fail=1)
    recorder = FakeRecorder()

    async def main() -> None:
        app, ari = fake_app(settings, committer, recorder)
        app.writer.start()
        await run_call(app, ari, "ch-1", "11")
        await wait_for(lambda: committer.written, 10, "the late row")
        await app.writer.close(1)
        assert ari.variables["ch-1"]["CONSENTIVR_LOGGED"] == "no"
        assert ari.variables["ch-1"]["CONSENTIVR_RECORDING"] == "no"
        assert ari.variables["ch-1"]["CONSENTIVR_DECISION_RECORDING"] == "error"
        assert ari.continued["ch-1"] == ("consentivr-dest", "s", 1)

    asyncio.run(main())
    assert recorder.started == [], "no recording without a committed decision"
    [(kind, first)] = committer.failed
    assert kind == "append" and first.decisions["recording"] == Decision.YES
    [(kind, late)] = committer.written
    assert kind == "append"
    assert set(late.decisions.values()) == {Decision.ERROR}
    assert late.recording_path is None and late.callback_until is None
    assert late.outcome.startswith("error: not logged before the call went on")
    assert [k.digit for k in late.keys] == ["1", "1"], "the keys stay as evidence"


def test_slow_commit_goes_on_unrecorded_and_late_commit_is_marked(settings: Settings) -> None:
    committer = FakeCommitter(delay=0.6)
    recorder = FakeRecorder()

    async def main() -> None:
        app, ari = fake_app(settings, committer, recorder, decision_timeout=0.2)
        app.writer.start()
        await run_call(app, ari, "ch-2", "12")
        assert ari.variables["ch-2"]["CONSENTIVR_RECORDING"] == "no"
        await wait_for(lambda: len(committer.written) == 2, 10, "the late mark")
        await app.writer.close(1)

    asyncio.run(main())
    assert recorder.started == []
    (k1, rec), (k2, mark) = committer.written
    assert k1 == "append" and rec.decisions["recording"] == Decision.YES
    # The late row allowed recording and a callback; the call was told "error".
    assert k2 == "void_late_consent" and mark[0] == rec.call_id
    assert "after the call went on" in mark[1]


def test_ami_down_when_recording_should_start_row_says_not_confirmed(
    settings: Settings, tmp_path: Path,
) -> None:
    log = ConsentLog(tmp_path / "c.db", CallerKey(b"k" * 32))
    committer = FakeCommitter(log=log)

    async def main() -> FakeAri:
        app, ari = fake_app(settings, committer, FakeRecorder(fail=True))
        app.writer.start()
        await run_call(app, ari, "ch-3", "11")
        await app.writer.close(1)
        return ari

    ari = asyncio.run(main())
    [row] = rows(tmp_path / "c.db")
    assert row["decisions"]["recording"] == "yes"
    assert row["recording_confirmed"] == 0
    assert "not connected" in row["recording_error"]
    assert ari.variables["ch-3"]["CONSENTIVR_RECORDING"] == "no"
    assert ari.variables["ch-3"]["CONSENTIVR_LOGGED"] == "yes"


class _FlakyLog:
    """A consent log whose first ``fail`` batches fail (disk full), then work."""

    def __init__(self, real: ConsentLog, fail: int) -> None:
        self.real = real
        self.fail = fail
        self.path = real.path
        self.conn = real.conn

    def transaction(self) -> Any:
        if self.fail > 0:
            self.fail -= 1
            raise StoreError("consent.db: cannot write the consent log: database or disk is full")
        return self.real.transaction()

    def append_many(self, records: list[DecisionRecord]) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise StoreError("consent.db: cannot write the consent log: database or disk is full")
        self.real.append_many(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_group_committer_survives_a_failed_batch(tmp_path: Path) -> None:
    real = ConsentLog(tmp_path / "c.db", CallerKey(b"k" * 32))
    committer = GroupCommitter(lambda: _FlakyLog(real, fail=1))
    try:
        first = committer.submit("append", record())
        with pytest.raises(StoreError, match="disk is full"):
            first.result(timeout=10)
        second = committer.submit("append", record())
        second.result(timeout=10)
        assert committer._thread.is_alive()
    finally:
        committer.close()
    assert len(rows(tmp_path / "c.db")) == 1


def test_group_committer_survives_a_locked_database(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    committer = GroupCommitter(lambda: ConsentLog(path, CallerKey(b"k" * 32)))
    try:
        committer.submit("append", record()).result(timeout=10)
        thread = hold_lock_in_thread(path, 6.5)  # longer than the 5 s busy timeout
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            committer.submit("append", record()).result(timeout=20)
        assert time.monotonic() - started < 6.5
        thread.join()
        committer.submit("append", record()).result(timeout=10)
    finally:
        committer.close()
    assert len(rows(path)) == 2


def test_service_starts_and_fails_closed_when_the_database_cannot_open(
    tmp_path: Path,
) -> None:
    """A log that cannot be opened does not stop the service: writes fail (StoreError)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    lazy = LazyLog(blocker / "consent.db", CallerKey(b"k" * 32))
    committer = GroupCommitter(lambda: lazy)
    try:
        with pytest.raises(StoreError, match="cannot open the consent log"):
            committer.submit("append", record()).result(timeout=10)
        assert committer._thread.is_alive()
    finally:
        committer.close()


# =========================================================================== unit: recovery


def _recovery_app(settings: Settings, logged: LoggedCall | None = None, *,
                  committer: Any = None, recorder: Any = None,
                  lookup_error: bool = False) -> tuple[StasisApp, FakeAri]:
    async def lookup(uniqueid: str) -> LoggedCall | None:
        if lookup_error:
            raise StoreError("consent.db: cannot read the consent log: disk I/O error")
        return logged if logged is not None and uniqueid == "orphan" else None

    app, ari = fake_app(settings, committer, recorder, lookup=lookup)
    ari.channels["orphan"] = {
        "id": "orphan", "name": "PJSIP/alice-0001", "state": "Up",
        "caller": {"number": "+31201234567"},
        "dialplan": {"context": "in", "exten": "100", "priority": 2,
                     "app_name": "Stasis", "app_data": "consentivr,main"},
        "creationtime": "2026-01-02T10:11:12.345+0000",
    }
    ari.in_app.add("orphan")
    return app, ari


async def _reconcile(app: StasisApp, ari: FakeAri) -> float:
    started = time.monotonic()
    await app.reconcile(settle=0)
    await wait_for(lambda: "orphan" not in app.recovering and not app.tasks, 10, "recovery")
    return time.monotonic() - started


def test_recovery_without_a_row_logs_error_and_continues(settings: Settings) -> None:
    committer = FakeCommitter()
    recorder = FakeRecorder()
    app, ari = _recovery_app(settings, committer=committer, recorder=recorder)
    took = asyncio.run(_reconcile(app, ari))
    assert took < BUDGET
    assert ari.continued["orphan"] == ("consentivr-dest", "s", 1)
    [(kind, rec)] = committer.written
    assert kind == "append" and rec.channel_id == "orphan"
    assert set(rec.decisions.values()) == {Decision.ERROR}
    assert rec.recording_path is None and rec.outcome.startswith("error: taken back")
    assert rec.started_at == pytest.approx(1767348672.345)  # the channel's creationtime
    v = ari.variables["orphan"]
    assert (v["CONSENTIVR_LOGGED"], v["CONSENTIVR_RECORDING"]) == ("yes", "no")
    assert v["CONSENTIVR_CALL_ID"] == rec.call_id
    assert recorder.started == []


@pytest.mark.parametrize(
    ("path_ok", "confirmed", "running", "expect_start", "expect_recording"),
    [
        (True, None, False, True, True),  # died between commit and MixMonitor: start it
        (True, None, True, False, True),  # MixMonitor runs already: only mark it
        (True, True, False, False, True),  # confirmed: it outlived us in Asterisk
        (True, False, False, False, False),  # it had failed: stays unrecorded
        (False, None, False, False, False),  # a path that is not ours: never
    ],
)
def test_recovery_resumes_a_committed_decision(
    settings: Settings, path_ok: bool, confirmed: bool | None, running: bool,
    expect_start: bool, expect_recording: bool,
) -> None:
    call_id = uuid.uuid4().hex
    directory = settings.recordings.dir
    path = f"{directory}/{call_id}.wav" if path_ok else f"{directory}/../{call_id}.wav"
    logged = LoggedCall(call_id, "main", "en", {"recording": "yes", "callback": "no"},
                        path, confirmed)
    committer = FakeCommitter()
    recorder = FakeRecorder()
    app, ari = _recovery_app(settings, logged, committer=committer, recorder=recorder)
    if running:
        ari.variables["orphan"] = {"MIXMONITOR_FILENAME": path}
    asyncio.run(_reconcile(app, ari))
    v = ari.variables["orphan"]
    assert v["CONSENTIVR_CALL_ID"] == call_id
    assert v["CONSENTIVR_LOGGED"] == "yes"
    assert v["CONSENTIVR_DECISION_RECORDING"] == "yes"
    assert v["CONSENTIVR_DECISION_CALLBACK"] == "no"
    assert v["CONSENTIVR_RECORDING"] == ("yes" if expect_recording else "no")
    assert recorder.started == ([("PJSIP/alice-0001", path, "b")] if expect_start else [])
    marks = [p for k, p in committer.written if k == "mark_recording"]
    if confirmed is None and path_ok:
        assert [(m[0], m[1]) for m in marks] == [(call_id, True)]
    else:
        assert marks == []
    assert not [k for k, _ in committer.written if k == "append"], "the row exists already"
    assert "orphan" in ari.continued


def test_recovery_no_decision_means_no_recording_even_if_asked(settings: Settings) -> None:
    logged = LoggedCall(uuid.uuid4().hex, "main", "en", {"recording": "no"}, None, None)
    recorder = FakeRecorder()
    app, ari = _recovery_app(settings, logged, recorder=recorder)
    asyncio.run(_reconcile(app, ari))
    assert recorder.started == []
    assert ari.variables["orphan"]["CONSENTIVR_RECORDING"] == "no"


def test_recovery_hangup_mode(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, extra="recovery: hangup")
    assert settings.recovery == "hangup"
    committer = FakeCommitter()
    app, ari = _recovery_app(settings, committer=committer)
    asyncio.run(_reconcile(app, ari))
    assert "orphan" in ari.hung_up and "orphan" not in ari.continued
    assert [k for k, _ in committer.written] == ["append"], "the call still gets its row"


def test_recovery_lookup_failure_is_treated_as_undecided(settings: Settings) -> None:
    recorder = FakeRecorder()
    app, ari = _recovery_app(settings, recorder=recorder, lookup_error=True)
    asyncio.run(_reconcile(app, ari))
    assert recorder.started == []
    assert ari.variables["orphan"]["CONSENTIVR_RECORDING"] == "no"
    assert "orphan" in ari.continued


def test_recovery_finishes_within_budget_when_the_log_hangs(settings: Settings) -> None:
    committer = FakeCommitter(delay=5)
    app, ari = _recovery_app(settings, committer=committer)
    took = asyncio.run(_reconcile(app, ari))
    assert took < BUDGET + 0.2
    v = ari.variables["orphan"]
    assert (v["CONSENTIVR_LOGGED"], v["CONSENTIVR_RECORDING"]) == ("no", "no")
    assert "orphan" in ari.continued


def test_recovery_leaves_live_sessions_alone_and_ends_vanished_ones(settings: Settings) -> None:
    async def main() -> tuple[StasisApp, FakeAri]:
        app, ari = fake_app(settings)
        ari.play_seconds = 30  # keep the calls in their notice
        for ch in ("live", "vanished"):
            ari.channels[ch] = {"id": ch}
            ari.in_app.add(ch)
            app.handle_event(stasis_start(ch))
        await wait_for(lambda: len(app.sessions) == 2, 5, "two sessions")
        del ari.channels["vanished"]
        ari.in_app.discard("vanished")  # it hung up while our websocket was down
        await app.reconcile(settle=0)
        await wait_for(lambda: "vanished" not in app.sessions, 5, "the vanished call to end")
        assert "live" in app.sessions and not app.recovering
        return app, ari

    _, ari = asyncio.run(main())
    assert "live" not in ari.continued and "live" not in ari.hung_up


def test_stasis_start_during_recovery_is_not_doubled(settings: Settings) -> None:
    async def main() -> FakeAri:
        app, ari = _recovery_app(settings)
        await app.reconcile(settle=0)
        app.handle_event(stasis_start("orphan"))  # a late duplicate of the channel
        assert "orphan" not in app.sessions
        await wait_for(lambda: not app.tasks, 5, "recovery")
        return ari

    ari = asyncio.run(main())
    assert [c for c in ari.calls if c[0] == "answer"] == []


# =========================================================================== unit: AMI


class FakeAmi:
    """A tiny AMI server: logs in (or refuses), answers MixMonitor, can hang up on it."""

    def __init__(self, secret: str, refuse_login: bool = False,
                 drop_on_mixmonitor: bool = False) -> None:
        self.secret = secret
        self.refuse_login = refuse_login
        self.drop_on_mixmonitor = drop_on_mixmonitor
        self.connections = 0
        self.actions: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        try:
            while True:
                block = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(": ", 1) for line in
                              block.decode().strip().split("\r\n") if ": " in line)
                self.actions.append(fields)
                action = fields.get("Action", "").lower()
                aid = fields.get("ActionID", "")
                if action == "login":
                    ok = not self.refuse_login and fields.get("Secret") == self.secret
                    msg = "Authentication accepted" if ok else "Authentication failed"
                    writer.write(f"Response: {'Success' if ok else 'Error'}\r\n"
                                 f"ActionID: {aid}\r\nMessage: {msg}\r\n\r\n".encode())
                    await writer.drain()
                    if not ok:
                        writer.close()
                        return
                elif action == "mixmonitor" and self.drop_on_mixmonitor:
                    writer.transport.abort()
                    return
                else:
                    writer.write(f"Response: Success\r\nActionID: {aid}\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def ami_settings(port: int, secret: str, timeout: float = 5.0) -> AmiSettings:
    return AmiSettings(host="127.0.0.1", port=port, username="consentivr", password=secret,
                       connections=1, timeout=timeout)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def test_ami_login_refused_is_logged_without_the_secret_and_retried(
    all_logs: pytest.LogCaptureFixture,
) -> None:
    secret = "ami-S3cret-never-logged"
    redaction.install([secret])

    async def main() -> FakeAmi:
        server = FakeAmi(secret, refuse_login=True)
        await server.start()
        pool = AmiPool(ami_settings(server.port, secret))
        with pytest.raises(AmiError) as err:
            await pool.connect(wait=2.5)
        assert secret not in str(err.value)
        pool.close()
        await server.close()
        return server

    server = asyncio.run(main())
    assert "refused the login" in all_logs.text
    assert 2 <= server.connections <= 4, "retried, with a growing delay"
    assert server.actions[0]["Secret"] == secret  # it was really sent...
    assert secret not in all_logs.text  # ...and never logged


def test_ami_action_fails_fast_when_the_connection_drops_and_is_never_replayed() -> None:
    secret = "ami-secret-1234"

    async def main() -> tuple[FakeAmi, float, int]:
        server = FakeAmi(secret, drop_on_mixmonitor=True)
        await server.start()
        pool = AmiPool(ami_settings(server.port, secret, timeout=5))
        await pool.connect(wait=5)
        started = time.monotonic()
        with pytest.raises(AmiError, match="connection lost"):
            await Recorder(pool).start("PJSIP/a-1", "/rec/x.wav", "b")
        took = time.monotonic() - started
        await wait_for(lambda: pool.logins >= 2, 10, "the AMI reconnect")
        await asyncio.sleep(0.5)  # panoramisk would replay queued actions now
        logins = pool.logins
        pool.close()
        await server.close()
        return server, took, logins

    server, took, logins = asyncio.run(main())
    assert took < 1.0, "the caller must not wait for the AMI timeout"
    assert logins >= 2
    mixmonitors = [a for a in server.actions if a.get("Action") == "MixMonitor"]
    assert len(mixmonitors) == 1, "a failed MixMonitor must never be sent again later"


@pytest.mark.parametrize("hostile", [
    "PJSIP/a-1\r\nAction: Command\r\nCommand: core stop now",
    "PJSIP/a-1\nCommand: core stop now",
    "PJSIP/a-1\0",
])
def test_ami_refuses_values_with_line_breaks(hostile: str) -> None:
    secret = "ami-secret-1234"

    async def main() -> FakeAmi:
        server = FakeAmi(secret)
        await server.start()
        pool = AmiPool(ami_settings(server.port, secret))
        await pool.connect(wait=5)
        with pytest.raises(AmiError, match="line break"):
            await Recorder(pool).start(hostile, "/rec/x.wav", "b")
        pool.close()
        await server.close()
        return server

    server = asyncio.run(main())
    assert [a["Action"] for a in server.actions] == ["Login"]


# =========================================================================== unit: ARI


class FakeAriServer:
    """aiohttp app that answers 401 unless the right password comes, and logs paths."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.paths: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.paths.append(request.raw_path)
            want = redaction.basic_auth_token("consentivr", self.password)
            if request.headers.get("Authorization") != f"Basic {want}":
                return web.json_response({"message": "Authentication required"}, status=401)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def test_ari_wrong_password_never_reaches_errors_or_logs(
    all_logs: pytest.LogCaptureFixture,
) -> None:
    wrong = "ari-Wr0ng-password-xyz"
    redaction.install([wrong, redaction.basic_auth_token("consentivr", wrong)])

    async def main() -> str:
        server = FakeAriServer("right-password")
        await server.start()
        client = AriClient(AriSettings(url=server.url, username="consentivr", password=wrong))
        with pytest.raises(AriError) as err:
            await client.answer("ch-1")

        async def events() -> None:
            async for _ in client.events("consentivr"):
                pass

        task = asyncio.create_task(events())
        await asyncio.sleep(0.8)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
        await server.close()
        return str(err.value)

    message = asyncio.run(main())
    assert "HTTP 401" in message
    assert "check the ARI username and password" in all_logs.text
    token = redaction.basic_auth_token("consentivr", wrong)
    for text in (message, all_logs.text):
        assert wrong not in text and token not in text


@pytest.mark.parametrize("channel_id", [
    "1700000000.42", "a/b", "x?y=1#z", "../../bridges/b1", "é;'\"", "a%2Fb", "a b\tc",
])
def test_ari_paths_quote_channel_ids(channel_id: str) -> None:
    """Whatever the id, the server sees one path segment that decodes to it."""
    from urllib.parse import unquote

    async def main() -> list[str]:
        server = FakeAriServer("pw-123456")
        await server.start()
        client = AriClient(AriSettings(url=server.url, username="consentivr",
                                       password="pw-123456"))
        await client.answer(channel_id)
        await client.close()
        await server.close()
        return server.paths

    [raw] = asyncio.run(main())
    assert raw.startswith("/ari/channels/") and raw.endswith("/answer")
    segment = raw.removeprefix("/ari/channels/").removesuffix("/answer")
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert unquote(segment) == channel_id


@pytest.mark.parametrize("channel_id", ["", ".", "..", "..."])
def test_ari_refuses_dot_ids(channel_id: str) -> None:
    async def main() -> None:
        client = AriClient(AriSettings(url="http://127.0.0.1:1", username="u", password="p"))
        with pytest.raises(AriError, match="refusing"):
            await client.answer(channel_id)
        await client.close()

    asyncio.run(main())


# =========================================================================== unit: security


@pytest.mark.parametrize(("message", "leak"), [
    ("Fail to send {'Action': 'Login', 'Username': 'u', 'Secret': 'unknown-1'}", "unknown-1"),
    ("Action: Login\r\nSecret: unknown-2\r\n", "unknown-2"),
    ("Authorization: Basic dW5rbm93bjp1bmtub3du", "dW5rbm93bjp1bmtub3du"),
    ("url?password=unknown-3&x=1", "unknown-3"),
    ("connecting with ari-Pa55word-xyz", SECRETS[0]),
    ("repr: b'ami-Pa55word-xyz'", SECRETS[1]),
])
def test_redactor_masks_secrets_and_secret_fields(message: str, leak: str) -> None:
    redactor = redaction.SecretRedactor(SECRETS)
    out = redactor.redact(message)
    assert leak not in out and redaction.MASK in out


def test_redaction_covers_args_exceptions_and_every_handler(
    all_logs: pytest.LogCaptureFixture,
) -> None:
    secret = "hmac-Key-0123456789abcdef"
    redaction.install([secret.encode()])
    late_handler_lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            late_handler_lines.append(self.format(record))

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        log = logging.getLogger("panoramisk.manager")
        log.error("Fail to send %r", {"Action": "Login", "Secret": secret})
        try:
            raise ValueError(f"bad key {secret}")
        except ValueError:
            logging.getLogger("consentivr.x").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    assert late_handler_lines and all_logs.records
    text = "\n".join(late_handler_lines) + all_logs.text
    assert secret not in text
    assert "bad key [redacted]" in text


def test_short_secrets_get_a_warning(all_logs: pytest.LogCaptureFixture) -> None:
    redaction.install(["abc"])
    assert "shorter than" in all_logs.text


def test_database_is_created_0600_and_recordings_dir_2770(settings: Settings) -> None:
    # 2770: MixMonitor (group asterisk) writes there, nobody else reads (issue 19)
    prepare_paths(settings)
    open_database(settings.database).close()
    assert stat.S_IMODE(settings.database.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.recordings.dir.stat().st_mode) == 0o2770
    key = load_or_create_key(settings.database, None)
    key_path = settings.database.with_name(settings.database.name + ".key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and len(key.key) == 64


def test_existing_recordings_dir_loses_others_and_keeps_its_group(settings: Settings) -> None:
    settings.recordings.dir.mkdir(parents=True, mode=0o755)
    os.chmod(settings.recordings.dir, 0o2775)
    prepare_paths(settings)
    assert stat.S_IMODE(settings.recordings.dir.stat().st_mode) == 0o2770


def test_world_readable_database_warns(settings: Settings,
                                       caplog: pytest.LogCaptureFixture) -> None:
    open_database(settings.database).close()
    os.chmod(settings.database, 0o644)
    with caplog.at_level(logging.WARNING):
        prepare_paths(settings)
    assert "readable by group or others" in caplog.text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_readable_auto_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    db = tmp_path / "consent.db"
    load_or_create_key(db, None)
    os.chmod(tmp_path / "consent.db.key", mode)
    with pytest.raises(StoreError, match="readable by others"):
        load_or_create_key(db, None)


@pytest.mark.parametrize("mode", [0o640, 0o644])
def test_readable_key_or_password_file_is_refused(tmp_path: Path, mode: int) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("a-long-secret-value\n")
    os.chmod(secret_file, mode)
    text = (tmp_path / "config.yaml")
    settings_in(tmp_path)  # writes config.yaml
    body = text.read_text().replace(f'password: "{SECRETS[0]}"',
                                    f"password_file: {secret_file}")
    text.write_text(body + f"caller_key_file: {secret_file}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(text)
    assert len([p for p in err.value.problems if "readable by others" in p]) == 2
    assert "a-long-secret-value" not in str(err.value)


def test_secrets_come_from_env_and_files(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "ami.secret"
    secret_file.write_text("from-a-file-123\n")
    os.chmod(secret_file, 0o600)
    monkeypatch.setenv("CVR_TEST_ARI_PW", "from-the-env-456")
    settings_in(tmp_path)
    path = tmp_path / "config.yaml"
    body = path.read_text().replace(f'password: "{SECRETS[0]}"', "password_env: CVR_TEST_ARI_PW")
    body = body.replace(f'password: "{SECRETS[1]}"', f"password_file: {secret_file}")
    path.write_text(body)
    settings = load_settings(path)
    assert settings.ari.password == "from-the-env-456"
    assert settings.ami is not None and settings.ami.password == "from-a-file-123"
    assert "from-the-env-456" not in repr(settings) and "from-a-file-123" not in repr(settings)


def test_listeners_default_to_localhost() -> None:
    agi = pytest.importorskip("consentivr.agi")
    assert agi.DEFAULT_HOST == "127.0.0.1"
    import inspect

    assert inspect.signature(agi.AgiServer.start).parameters["host"].default == "127.0.0.1"


# =========================================================================== integration


pbx_tests = pytest.mark.asterisk


def _workdir(pbx: Any) -> Path:
    base: Path = pbx.shared_dir
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="faults-", dir=base))


@pytest.fixture
def bed_factory(pbx: Any) -> Callable[..., Testbed]:
    pbx.set_dialplan(dialplan_for_tests(agent_sound="demo-thanks"))

    def make(flows: str | None = None, extra: str = "", mode: str = "ari") -> Testbed:
        return Testbed(pbx, _workdir(pbx), flows or flow_yaml(timeout=2.0), extra_config=extra,
                       mode=mode)

    return make


def run(bed: Testbed, scenario: Callable[[Testbed], Awaitable[Any]], timeout: float = 120,
        with_service: bool = True) -> Any:
    async def main() -> Any:
        await bed.start(with_service=with_service)
        try:
            return await asyncio.wait_for(scenario(bed), timeout)
        finally:
            await bed.stop()

    return asyncio.run(main())


async def in_app(bed: Testbed) -> list[str]:
    data = await bed.caller.application(bed.app_name)
    return list((data or {}).get("channel_ids", []))


async def dest_for(bed: Testbed, stasis_id: str, timeout: float = 10) -> tuple[str, str | None]:
    """The call id our row has for this channel, and what the destination saw."""
    db = bed.settings.database
    row = await wait_for(lambda: next((r for r in rows(db) if r["uniqueid"] == stasis_id), None),
                         timeout, f"a row for {stasis_id}")
    return row["call_id"], await bed.reached_destination(row["call_id"], timeout)


async def answer_keys(bed: Testbed, call: LocalCall, keys: str) -> None:
    for index, key in enumerate(keys):
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, index)
        await bed.press(call, key)


@pbx_tests
def test_crash_mid_menu_call_is_taken_back_within_two_seconds(
    bed_factory: Callable[..., Testbed],
) -> None:
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"))

    async def scenario(bed: Testbed) -> tuple[float, str | None, str]:
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        await asyncio.sleep(0.5)
        assert call.stasis_id in await in_app(bed), "the call waits in Stasis"
        started = time.monotonic()
        await bed.start_service()  # connected when it returns
        await wait_for(lambda: _not_in(bed, call.stasis_id), 10, "the call to leave Stasis",
                       step=0.02)
        took = time.monotonic() - started
        call_id, seen = await dest_for(bed, call.stasis_id)
        await bed.channel_gone(call.stasis_id)
        return took, seen, call_id

    took, seen, call_id = run(bed, scenario)
    assert took < BUDGET + 1.0, f"taking the call back took {took:.2f}s"
    [row] = rows(bed.settings.database)
    assert row["call_id"] == call_id
    assert set(row["decisions"].values()) == {"error"}
    assert row["outcome"].startswith("error: taken back") and row["recording_path"] is None
    assert seen == "yes/no/error/error/en"
    assert list(bed.recordings_dir.iterdir()) == []


async def _not_in(bed: Testbed, channel_id: str) -> bool:
    return channel_id not in await in_app(bed)


@pbx_tests
def test_crash_after_a_committed_yes_recording_starts_on_recovery(
    bed_factory: Callable[..., Testbed],
) -> None:
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"))

    async def scenario(bed: Testbed) -> tuple[str, str | None]:
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        # As if the crashed process had committed a yes just before dying.
        call_id = committed_yes(bed, call.stasis_id)
        await bed.start_service()
        seen = await bed.reached_destination(call_id, 10)
        await bed.channel_gone(call.stasis_id)
        return call_id, seen

    call_id, seen = run(bed, scenario)
    assert seen is not None and seen.startswith("yes/yes/yes")
    [row] = rows(bed.settings.database)
    assert row["recording_confirmed"] == 1
    [path] = list(bed.recordings_dir.iterdir())
    assert path.name == f"{call_id}.wav" and path.stat().st_size > 1000


@pbx_tests
def test_recovery_hangup_mode_on_the_real_pbx(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"), extra="recovery: hangup")

    async def scenario(bed: Testbed) -> None:
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        await bed.start_service()
        await bed.channel_gone(call.stasis_id, timeout=5)

    run(bed, scenario)
    [row] = rows(bed.settings.database)
    assert row["outcome"].startswith("error: taken back")


@pbx_tests
def test_events_websocket_cut_the_call_goes_on(
    bed_factory: Callable[..., Testbed], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bed = bed_factory(flow_yaml(timeout=8.0))
    proxy = TcpProxy(*_host_port(bed.endpoints.ari_url))

    async def scenario(bed: Testbed) -> str:
        await proxy.start()
        bed.settings = _via(bed.settings, ari_url=proxy.url)
        await bed.start_service()
        assert bed.service is not None
        call = await bed.call()
        # Cut while the flow waits for the answer, with no REST request in flight (a
        # request in flight: test_events_websocket_cut_with_a_play_in_flight_...).
        await bed.wait_phase(call, Phase.QUESTION_WAIT, 0)
        bed.service.connected.clear()
        assert proxy.cut() >= 1
        await asyncio.wait_for(bed.service.connected.wait(), 15)
        await bed.press(call, "1")
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 1)
        await bed.press(call, "2")
        await bed.wait_left_app(call)
        await bed.channel_gone(call.stasis_id)
        await proxy.close()
        return call.stasis_id

    stasis_id = run(bed, scenario, with_service=False)
    [row] = rows(bed.settings.database)
    assert row["uniqueid"] == stasis_id
    assert row["decisions"] == {"recording": "yes", "callback": "no"}
    assert row["recording_confirmed"] == 1
    assert "ARI events reconnected" in caplog.text


@pbx_tests
@pytest.mark.parametrize(("when", "keys", "seen", "resent"), [
    # Asterisk never got the play: asked for over HTTP, not there, played over HTTP.
    ("request", "12", "yes/yes/yes/no/en", "sent again over HTTP"),
    # Asterisk ran the play, its answer was lost: the playback is there, not replayed
    # (Asterisk would take the same playback id again and play the notice twice).
    ("answer", "21", "yes/no/no/yes/en", "the playback is there"),
])
def test_events_websocket_cut_with_a_play_in_flight_the_call_gets_its_menu(
    bed_factory: Callable[..., Testbed], caplog: pytest.LogCaptureFixture,
    when: str, keys: str, seen: str, resent: str,
) -> None:
    """The race a fresh-clone CI run once met: the websocket drops while the notice's
    ``play`` is in flight on it. The play goes again over HTTP only if Asterisk has no
    such playback, the caller still gets the menu, and the answer counts as given."""
    caplog.set_level(logging.INFO)
    bed = bed_factory(flow_yaml(timeout=8.0))
    proxy = RestCutProxy(*_host_port(bed.endpoints.ari_url), uri_part="/play/", when=when)

    async def scenario(bed: Testbed) -> tuple[str, str, str | None, list[str]]:
        await proxy.start()
        bed.settings = _via(bed.settings, ari_url=proxy.url)
        await bed.start_service()
        assert bed.service is not None and bed.service.ari is not None
        assert await bed.service.ari.rest_transport() == "websocket"
        async with playbacks_started(bed) as started:
            bed.service.connected.clear()
            call = await bed.call()
            await asyncio.wait_for(proxy.fired.wait(), 15)
            await asyncio.wait_for(bed.service.connected.wait(), 15)
            await answer_keys(bed, call, keys)
            await bed.wait_left_app(call)
            call_id, reached = await dest_for(bed, call.stasis_id)
            await bed.channel_gone(call.stasis_id)
        await proxy.close()
        return call.stasis_id, call_id, reached, started

    stasis_id, call_id, reached, started = run(bed, scenario, with_service=False)
    assert proxy.request is not None
    notice = f"{stasis_id}-p1"
    assert proxy.request["uri"].startswith(f"channels/{stasis_id}/play/{notice}?")
    assert started.count(notice) == 1, "the notice plays once, not twice"
    assert f"{resent}" in caplog.text
    assert "ARI events reconnected" in caplog.text
    [row] = rows(bed.settings.database)
    assert row["uniqueid"] == stasis_id
    want = {"1": "yes", "2": "no"}
    assert row["decisions"] == {"recording": want[keys[0]], "callback": want[keys[1]]}
    assert reached == seen
    recordings = {p.name for p in bed.recordings_dir.iterdir()}
    if keys[0] == "1":
        assert row["recording_confirmed"] == 1
        assert recordings == {f"{call_id}.wav"}
    else:
        assert row["recording_path"] is None
        assert recordings == set()


@contextlib.asynccontextmanager
async def playbacks_started(bed: Testbed) -> AsyncIterator[list[str]]:
    """The ids of every playback Asterisk starts meanwhile, seen straight from Asterisk
    (not through the proxy) by an app subscribed to everything."""
    ep = bed.endpoints
    started: list[str] = []
    auth = base64.b64encode(f"{ep.ari_user}:{ep.ari_password}".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {auth}"}) as session, \
            session.ws_connect(f"{ep.ari_url}/ari/events",
                               params={"app": "cvr-watch", "subscribeAll": "true"}) as ws:
        async def read() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                if event.get("type") == "PlaybackStarted":
                    started.append(event["playback"]["id"])

        reader = asyncio.create_task(read())
        try:
            yield started
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _via(settings: Settings, *, ari_url: str | None = None,
         ami_port: int | None = None) -> Settings:
    import dataclasses

    ari = dataclasses.replace(settings.ari, url=ari_url) if ari_url else settings.ari
    ami = settings.ami
    if ami is not None and ami_port:
        ami = dataclasses.replace(ami, port=ami_port, timeout=2.0)
    return dataclasses.replace(settings, ari=ari, ami=ami)


@pbx_tests
def test_ami_down_call_goes_on_unconfirmed_then_ami_comes_back(
    bed_factory: Callable[..., Testbed], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bed = bed_factory()
    proxy = TcpProxy(bed.endpoints.ami_host, bed.endpoints.ami_port)

    async def scenario(bed: Testbed) -> tuple[str | None, str | None]:
        await proxy.start()
        bed.settings = _via(bed.settings, ami_port=proxy.port)
        await bed.start_service()
        service = bed.service
        assert service is not None and service.pool is not None
        pool = service.pool
        proxy.refuse = True
        proxy.cut()
        await wait_for(lambda: pool.connected() == 0, 10, "AMI to drop")
        first = await bed.call()
        await answer_keys(bed, first, "11")
        await bed.wait_left_app(first)
        _, seen_down = await dest_for(bed, first.stasis_id)
        proxy.refuse = False
        await wait_for(lambda: pool.connected() > 0, 20, "AMI to come back")
        # With AMI, consentivr hears the withdrawal key again: recording may start.
        await wait_for(lambda: service.gate.reason is None, 20, "the withdrawal path")
        second = await bed.call()
        await answer_keys(bed, second, "11")
        await bed.wait_left_app(second)
        _, seen_up = await dest_for(bed, second.stasis_id)
        for call in (first, second):
            await bed.channel_gone(call.stasis_id)
        await proxy.close()
        return seen_down, seen_up

    seen_down, seen_up = run(bed, scenario, with_service=False)
    down, up = rows(bed.settings.database)
    assert seen_down == "yes/no/yes/yes/en" and seen_up == "yes/yes/yes/yes/en"
    assert down["decisions"]["recording"] == "yes" and down["recording_confirmed"] == 0
    # With AMI down consentivr cannot hear the withdrawal key: no recording (issue 19).
    assert "withdrawal key cannot be honoured" in down["recording_error"]
    assert up["recording_confirmed"] == 1
    assert {p.name for p in bed.recordings_dir.iterdir()} == {f"{up['call_id']}.wav"}
    assert "AMI connection to" in caplog.text and "AMI reconnected" in caplog.text


@pbx_tests
@pytest.mark.parametrize("mode", ["ari", "agi"])
@pytest.mark.parametrize(("lock_seconds", "logged"), [(2.0, True), (9.0, False)])
def test_database_locked_during_a_call(
    bed_factory: Callable[..., Testbed], lock_seconds: float, logged: bool, mode: str,
) -> None:
    """A late commit, in both modes: the call waits at most 6 s, then goes on told
    "not logged"; the row the log gets later says what was acted on."""
    bed = bed_factory(mode=mode)

    async def scenario(bed: Testbed) -> str | None:
        call = await bed.call()
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 0)
        # The log exists (schema) before the lock; lock it while the caller answers.
        thread = hold_lock_in_thread(bed.settings.database, lock_seconds)
        await answer_keys_from(bed, call, "11", start=0)
        await bed.wait_left_app(call, timeout=30)
        seen = await _seen_by_channel(bed, call)
        await asyncio.to_thread(thread.join)
        if not logged:  # the late row lands once the lock is gone
            await wait_for(lambda: rows(bed.settings.database), 20, "the late row")
        await bed.channel_gone(call.stasis_id)
        return seen

    seen = run(bed, scenario)
    [row] = rows(bed.settings.database)
    if logged:
        assert seen == "yes/yes/yes/yes/en"
        assert row["recording_confirmed"] == 1 and len(list(bed.recordings_dir.iterdir())) == 1
    else:
        assert seen == "no/no/error/error/en"
        assert set(row["decisions"].values()) == {"error"}
        assert row["outcome"].startswith("error: not logged before the call went on")
        assert list(bed.recordings_dir.iterdir()) == []


async def answer_keys_from(bed: Testbed, call: LocalCall, keys: str, start: int) -> None:
    for index, key in enumerate(keys, start):
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, index)
        await bed.press(call, key)


async def _seen_by_channel(bed: Testbed, call: LocalCall) -> str | None:
    """What the destination saw, found through the call id the app gave the channel."""
    value = await bed.caller.get_variable(call.stasis_id, "CONSENTIVR_CALL_ID")
    return await bed.reached_destination(value, 10) if value else None


@pbx_tests
def test_database_disk_full(
    bed_factory: Callable[..., Testbed], pbx: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk fills up mid-service: the call goes on unrecorded, the row lands later."""
    caplog.set_level(logging.ERROR)
    work = _workdir(pbx)
    mount = work / "dbfs"
    with small_fs(mount, size_kb=1024):
        bed = _bed_with_database(pbx, work, mount / "consent.db")
        ballast: list[Path] = []

        async def scenario(bed: Testbed) -> tuple[str | None, str | None]:
            first = await bed.call()
            await answer_keys(bed, first, "22")  # a normal row: the log works
            await bed.wait_left_app(first)
            ballast.append(fill_up(mount))
            second = await bed.call()
            await answer_keys(bed, second, "11")
            await bed.wait_left_app(second, timeout=30)
            seen_fault = await _seen_by_channel(bed, second)
            ballast[0].unlink()
            third = await bed.call()
            await answer_keys(bed, third, "11")
            await bed.wait_left_app(third, timeout=30)
            seen_ok = await _seen_by_channel(bed, third)
            await wait_for(lambda: len(rows(bed.settings.database)) == 3, 40, "the late row")
            for call in (first, second, third):
                await bed.channel_gone(call.stasis_id)
            return seen_fault, seen_ok

        seen_fault, seen_ok = run(bed, scenario)
        logged = rows(bed.settings.database)
    assert seen_fault == "no/no/error/error/en"
    assert seen_ok == "yes/yes/yes/yes/en"
    _only_yes_rows_have_files(bed, logged, outcomes={
        "completed", "error: not logged before the call went on"})
    assert "decision NOT logged" in caplog.text and "full" in caplog.text


@pbx_tests
def test_database_on_a_read_only_file_system(
    bed_factory: Callable[..., Testbed], pbx: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """The service starts although the log cannot be opened; calls go on unrecorded;
    once the file system is writable again the log opens and the late row lands."""
    caplog.set_level(logging.ERROR)
    work = _workdir(pbx)
    mount = work / "dbfs"
    with small_fs(mount, size_kb=1024):
        bed = _bed_with_database(pbx, work, mount / "consent.db")
        load_or_create_key(bed.settings.database, None)  # the key exists; the log not yet
        remount(mount, "ro")

        async def scenario(bed: Testbed) -> tuple[str | None, str | None]:
            first = await bed.call()
            await answer_keys(bed, first, "11")
            await bed.wait_left_app(first, timeout=30)
            seen_fault = await _seen_by_channel(bed, first)
            remount(mount, "rw")
            second = await bed.call()
            await answer_keys(bed, second, "11")
            await bed.wait_left_app(second, timeout=30)
            seen_ok = await _seen_by_channel(bed, second)
            await wait_for(lambda: len(rows(bed.settings.database)) == 2, 40, "the late row")
            for call in (first, second):
                await bed.channel_gone(call.stasis_id)
            return seen_fault, seen_ok

        seen_fault, seen_ok = run(bed, scenario)
        logged = rows(bed.settings.database)
    assert seen_fault == "no/no/error/error/en"
    assert seen_ok == "yes/yes/yes/yes/en"
    _only_yes_rows_have_files(bed, logged, outcomes={
        "completed", "error: not logged before the call went on"})
    assert "Read-only file system" in caplog.text


def _bed_with_database(pbx: Any, work: Path, database: Path) -> Testbed:
    bed = Testbed(pbx, work, flow_yaml())
    bed.config_path.write_text(bed.config_path.read_text().replace(
        f"database: {work / 'consent.db'}", f"database: {database}"))
    bed.settings = load_settings(bed.config_path)
    return bed


def _only_yes_rows_have_files(bed: Testbed, logged: list[dict[str, Any]],
                              outcomes: set[str]) -> None:
    assert {r["outcome"].split(" (")[0] for r in logged} == outcomes
    files = {p.name for p in bed.recordings_dir.iterdir()}
    yes_rows = {f"{r['call_id']}.wav" for r in logged if r["decisions"]["recording"] == "yes"}
    assert files == yes_rows and len(files) == 1


@pbx_tests
def test_hostile_caller_id_on_the_real_pbx(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory()
    hostile = "../../etc/x;'\"`$(id)%00é"

    async def scenario(bed: Testbed) -> None:
        call = await bed.call(caller_number=hostile)
        await answer_keys(bed, call, "11")
        await bed.wait_left_app(call)
        await bed.channel_gone(call.stasis_id)

    run(bed, scenario)
    [row] = rows(bed.settings.database)
    assert row["recording_confirmed"] == 1
    [path] = list(bed.recordings_dir.iterdir())
    assert path.name == f"{row['call_id']}.wav"
    # Not a number: never kept in clear, logged as unparseable (a pseudonym of the text).
    assert row["caller_number"] is None and row["caller_hash"].startswith("unparseable:")


@pbx_tests
def test_no_secret_in_the_service_log_with_a_refused_ami_login(
    bed_factory: Callable[..., Testbed], all_logs: pytest.LogCaptureFixture,
) -> None:
    bed = bed_factory()
    wrong = "ami-Wrong-" + uuid.uuid4().hex

    async def scenario(bed: Testbed) -> None:
        assert bed.settings.ami is not None
        import dataclasses

        bed.settings = dataclasses.replace(
            bed.settings, ami=dataclasses.replace(bed.settings.ami, password=wrong))
        await start_without_waiting_for_ami(bed)
        call = await bed.call()
        await answer_keys(bed, call, "11")
        await bed.wait_left_app(call)
        await bed.channel_gone(call.stasis_id)

    run(bed, scenario, with_service=False)
    [row] = rows(bed.settings.database)
    assert row["recording_confirmed"] == 0
    assert "refused the login" in all_logs.text
    key = load_or_create_key(bed.settings.database, None).key.decode()
    for secret in (wrong, bed.endpoints.ari_password, key):
        assert secret not in all_logs.text


async def start_without_waiting_for_ami(bed: Testbed) -> None:
    """As ``consentivr serve`` does: AMI may log in later (or never)."""
    bed.service = Service(bed.settings)
    await bed.service.start()
    await asyncio.wait_for(bed.service.connected.wait(), 15)


# =========================================================================== Asterisk restart


@pytest.fixture(scope="module")
def own_pbx(pbx: Any) -> Iterator[SandboxPbx]:
    """A PBX of our own: restarting it must not disturb other tests."""
    if not isinstance(pbx, SandboxPbx):
        pytest.skip("restarting Asterisk needs the sandboxed PBX")
    base = Path(tempfile.mkdtemp(prefix="cvr-restart-", dir="/tmp"))
    own = SandboxPbx(base / "run", shared_dir=base / "shared")
    own.start()
    own.set_dialplan(dialplan_for_tests(agent_sound="demo-thanks"))
    try:
        yield own
    finally:
        own.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pbx_tests
def test_asterisk_restart_service_reconnects_and_records_again(
    own_pbx: SandboxPbx, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bed = Testbed(own_pbx, _workdir(own_pbx), flow_yaml())

    async def scenario(bed: Testbed) -> str | None:
        assert bed.service is not None and bed.service.pool is not None
        pool, service = bed.service.pool, bed.service
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        bed.service.connected.clear()
        await asyncio.to_thread(own_pbx.restart)
        await asyncio.wait_for(bed.service.connected.wait(), 30)
        await bed.wait_left_app(call, timeout=15)  # the reconcile ended the dead call
        await wait_for(lambda: pool.logins >= 2, 30, "AMI to log in again")
        # Recording starts again once the withdrawal key is proven to work again.
        await wait_for(lambda: service.gate.reason is None, 30, "the withdrawal path")
        # The caller's own websocket reconnects too; then a new call works.
        await wait_for(lambda: bed.caller.application(CALLER_APP), 30, "the caller app")
        call2 = await bed.call()
        await answer_keys(bed, call2, "11")
        await bed.wait_left_app(call2)
        seen = await _seen_by_channel(bed, call2)
        await bed.channel_gone(call2.stasis_id)
        return seen

    seen = run(bed, scenario, timeout=180)
    first, second = rows(bed.settings.database)
    assert first["outcome"] == "abandoned" and first["recording_path"] is None
    assert second["recording_confirmed"] == 1 and seen == "yes/yes/yes/yes/en"
    assert "ARI events reconnected" in caplog.text and "AMI reconnected" in caplog.text
