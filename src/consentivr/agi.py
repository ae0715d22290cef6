"""The FastAGI adapter: runs the same pure :class:`~consentivr.flow.CallFlow` as ARI mode.

For dialplan-centred installations (FreePBX among them) that reach us with
``AGI(agi://127.0.0.1:4573/<flow>)`` instead of ``Stasis()``. The flow decides
everything; this module only turns its commands into AGI commands and AGI
replies into flow events, exactly like :mod:`consentivr.app` does for ARI.

Why a server of our own, not panoramisk's FastAGI (measured with panoramisk 1.4,
see ``docs/agi.md``): its server freezes the whole event loop when a TCP
connection opens and closes with nothing sent (a health check does that), and
its synchronous routes fail on Python 3.11 (``asyncio.coroutine`` is gone).
The protocol is small: an environment of ``agi_*`` lines, then one command line
and one reply line at a time. Written directly on ``asyncio.start_server`` it gets
a time limit and size cap on the environment, a line limit and a timeout on every
command, and one bad connection can only ever end itself. (panoramisk stays in
use for AMI, where it works.)

How flow commands map to AGI (AGI is synchronous: one command at a time, and
digits pressed while no command runs are lost, so digits are only collected
inside ``STREAM FILE`` / ``SAY *`` / ``WAIT FOR DIGIT``):

- ``Answer`` -> ``ANSWER``.
- ``Play`` -> ``STREAM FILE <name> "0123456789*#"`` per media item (``digits:``,
  ``number:`` and ``characters:`` use ``SAY DIGITS/NUMBER/ALPHA``). A digit ends
  the whole prompt (barge-in) and becomes ``DigitPressed``; the end of the last
  item is ``PlaybackFinished``. A file that cannot be played is ``Failed`` (the
  caller did not hear it, so nothing they press may count).
- ``StartTimer`` of the flow's wait -> ``WAIT FOR DIGIT <ms>``: a digit, or
  ``TimerFired`` at 0. The menu deadline (``flow.MENU_DEADLINE``) is a wall-clock
  deadline checked around every blocking command, since AGI cannot interrupt one.
- ``StopPlayback`` / ``CancelTimer`` are no-ops: nothing runs in the background.
- ``LogDecision`` / ``MarkRecording`` -> the same :class:`~consentivr.store.GroupCommitter`.
- ``StartRecording`` -> ``EXEC MixMonitor <path>,<options>`` on this very channel,
  confirmed when the result is 0. It needs no AMI account (FreePBX-style setups
  rarely give one out) and avoids AMI's one-action-at-a-time queue; it confirms as
  much as the AMI action does (the app started). The flow only asks for it after
  a committed yes, as in ARI mode.
- ``SetVariables`` -> ``SET VARIABLE``.
- ``Continue`` -> ``SET CONTEXT``, ``SET EXTENSION``, ``SET PRIORITY`` (in that order),
  then we close the connection. ``SET PRIORITY p`` goes through Asterisk's explicit
  goto, so the dialplan resumes at priority ``p`` itself, not ``p+1`` (measured on
  Asterisk 22; ``tests/test_e2e.py`` checks it end to end).
- ``Hangup`` -> ``HANGUP``.

A ``HANGUP`` line, a ``511`` reply (dead channel) or the connection closing is
``HungUp``; a ``-1`` result is checked with ``CHANNEL STATUS``: a dead channel is
``HungUp``, a live one means the command failed (``Failed``). ``510``/``520``
(a command Asterisk rejects), a timeout or a garbled reply is ``Failed``: a bug of
ours, so nothing is recorded and the call goes on unconsented.

A malformed session (garbage, a half-sent environment, an environment that never
ends) is closed without a flow and without a log row; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from consentivr.app import Committer, clean_id
from consentivr.ari import assignments
from consentivr.config import Settings
from consentivr.errors import ConsentivrError
from consentivr.flow import (
    MENU_DEADLINE,
    Answer,
    CallFlow,
    CallInfo,
    CallStarted,
    CancelTimer,
    Command,
    Continue,
    DecisionLogged,
    DecisionRecord,
    DigitPressed,
    Event,
    Failed,
    Hangup,
    HungUp,
    LogDecision,
    MarkRecording,
    Phase,
    Play,
    PlaybackFinished,
    RecordingStarted,
    SetVariables,
    StartRecording,
    StartTimer,
    StopPlayback,
    TimerFired,
)
from consentivr.model import DTMF_KEYS, Flow

log = logging.getLogger(__name__)
Clock = Callable[[], float]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4573
ESCAPE_DIGITS = "0123456789*#"
ENV_TIMEOUT = 5.0  # Asterisk sends the whole environment at once
ENV_MAX_BYTES = 16 * 1024  # a real one is about 600 bytes
ENV_MAX_LINES = 200
LINE_LIMIT = 8 * 1024  # per line, both ways; Asterisk's own AGI buffer is 2 KiB
COMMAND_TIMEOUT = 10.0  # a non-blocking command (SET VARIABLE...) answers at once
LOG_TIMEOUT = 10.0  # a caller never waits longer than this for the consent log
MAX_ID = 150  # Asterisk's uniqueid is at most 150 characters
HARD_MARGIN = 30.0  # beyond the flow's menu deadline, like the ARI adapter's safety net

_ENV_LINE = re.compile(r"(agi_[A-Za-z0-9_]+):(?: (.*))?")
_REPLY = re.compile(r"(\d{3})([ -])(.*)")
_RESULT = re.compile(r"result=(-?\d+)(?: \((.*)\))?((?: [A-Za-z_]+=\S*)*)\s*")
_BARE_ARG = re.compile(r'[^\s"\\]+')
# MixMonitor splits its argument on ',' and Asterisk on quotes: keep paths plain.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+=@~-]+")
# Media URI scheme -> the AGI command that plays it with digit barge-in.
_PLAYERS = {
    "sound": "STREAM FILE",
    "digits": "SAY DIGITS",
    "number": "SAY NUMBER",
    "characters": "SAY ALPHA",
}
_DEAD = 511  # "Command Not Permitted on a dead channel or intercept routine"


class AgiError(ConsentivrError):
    """The AGI peer sent something we cannot use, went silent, or a command failed."""


class AgiConnectionLost(AgiError):
    """The connection closed (or was reset): the channel is no longer ours.

    ``partial``: the peer had sent part of a line before closing.
    """

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


# --- the wire protocol --------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One AGI reply: ``200 result=1 (value) endpos=3520``."""

    code: int
    result: int | None = None
    data: str | None = None  # the text in parentheses, e.g. GET VARIABLE's value
    fields: Mapping[str, str] = field(default_factory=dict)  # e.g. endpos
    text: str = ""  # the first line as received, for messages


def parse_reply(line: str) -> Reply:
    """Parse a reply's first line; AgiError for anything that is not an AGI reply."""
    m = _REPLY.fullmatch(line)
    if m is None:
        raise AgiError(f"not an AGI reply: {line[:80]!r}")
    code, rest = int(m.group(1)), m.group(3)
    if code != 200:
        return Reply(code, text=line)
    r = _RESULT.fullmatch(rest)
    if r is None:
        raise AgiError(f"AGI reply without a result: {line[:80]!r}")
    extra = dict(pair.split("=", 1) for pair in r.group(3).split())
    return Reply(200, int(r.group(1)), r.group(2), extra, line)


def parse_environment(lines: list[str]) -> dict[str, str]:
    """``agi_key: value`` lines (without the blank line) as a dict; AgiError if malformed."""
    env: dict[str, str] = {}
    for line in lines:
        m = _ENV_LINE.fullmatch(line)
        if m is None or "\0" in line:  # SQLite and the caller HMAC refuse NUL
            raise AgiError(f"not an AGI environment line: {line[:80]!r}")
        env[m.group(1)] = m.group(2) or ""
    for key in ("agi_channel", "agi_uniqueid"):
        if not env.get(key):
            raise AgiError(f"AGI environment without {key}")
    uniqueid = env["agi_uniqueid"]
    if len(uniqueid) > MAX_ID or not uniqueid.isprintable():
        raise AgiError(f"AGI environment with an impossible agi_uniqueid {uniqueid[:40]!r}")
    return env


def flow_name(env: Mapping[str, str]) -> str | None:
    """The ``<flow>`` of ``agi://host:port/<flow>``; None when the URL names none."""
    script = env.get("agi_network_script", "").split("?", 1)[0].strip("/")
    return script or None


def quote(arg: str) -> str:
    """One AGI command argument, quoted the way Asterisk's ``parse_args`` reads it."""
    if any(c in arg for c in "\r\n\0"):
        raise AgiError(f"an AGI argument cannot hold a line break: {arg[:40]!r}")
    if _BARE_ARG.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:4573`` for IPv6) -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:4573")
    host = host.removeprefix("[").removesuffix("]") or DEFAULT_HOST
    return host, int(port)


class AgiConnection:
    """One FastAGI connection: read the environment, then send commands, read replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.hung_up = False  # Asterisk said HANGUP (or 511): the channel is gone
        self.broken: str | None = None  # why we cannot talk any more, once we cannot
        # One watchdog timer per connection instead of an asyncio.timeout() per
        # command (that was 8% of the CPU): it fires at most once per deadline
        # passed, and re-arms only when a command's deadline is earlier.
        self._deadline: float | None = None  # loop time the pending reply is due by
        self._watchdog: asyncio.TimerHandle | None = None

    async def read_environment(self, timeout: float = ENV_TIMEOUT,
                               max_bytes: int = ENV_MAX_BYTES) -> dict[str, str]:
        lines: list[str] = []
        size = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        raw = await self._readline()
                    except AgiConnectionLost as exc:
                        if lines or exc.partial:
                            raise AgiError(f"connection closed after {len(lines)} "
                                           "AGI environment line(s)") from None
                        raise
                    size += len(raw)
                    if size > max_bytes or len(lines) >= ENV_MAX_LINES:
                        raise AgiError(f"AGI environment larger than {max_bytes} bytes")
                    line = _decode(raw)
                    if not line:
                        break
                    lines.append(line)
        except TimeoutError:
            raise AgiError(f"no complete AGI environment within {timeout:g}s") from None
        return parse_environment(lines)

    async def command(self, words: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> Reply:
        """Send one command and wait for its reply (HANGUP lines are noted and skipped)."""
        if self.broken:
            raise AgiConnectionLost(self.broken) if self.hung_up else AgiError(self.broken)
        line = " ".join([words, *(quote(a) for a in args)])
        try:
            self.writer.write(line.encode() + b"\n")
            await self.writer.drain()
            self._expect_by(timeout)
            try:
                return await self._read_reply()
            finally:
                self._deadline = None
        except TimeoutError:
            self.broken = f"AGI {words}: no reply within {timeout:g}s"
            raise AgiError(self.broken) from None
        except (ConnectionError, OSError) as exc:
            self.broken, self.hung_up = f"AGI connection lost ({exc})", True
            raise AgiConnectionLost(self.broken) from None
        except AgiConnectionLost as exc:
            self.broken, self.hung_up = str(exc), True
            raise
        except AgiError as exc:
            self.broken = str(exc)  # out of step with Asterisk: no further commands
            raise

    def _expect_by(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        if self._watchdog is None or self._watchdog.when() > deadline:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        deadline = self._deadline
        if deadline is None:
            return  # no reply pending: the next command arms it again
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self.reader.set_exception(TimeoutError())  # wakes the pending readline
        else:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    async def _read_reply(self) -> Reply:
        while True:
            line = _decode(await self._readline())
            if line == "HANGUP":
                self.hung_up = True
                continue
            reply = parse_reply(line)
            if line[3:4] == "-":  # 520-...: usage text until "520 End of proper usage."
                while not _decode(await self._readline()).startswith(f"{reply.code} "):
                    pass
            if reply.code == _DEAD:
                self.hung_up = True
            return reply

    async def _readline(self) -> bytes:
        try:
            raw = await self.reader.readline()
        except ValueError:  # longer than the stream's limit
            raise AgiError(f"AGI line longer than {LINE_LIMIT} bytes") from None
        if not raw.endswith(b"\n"):
            raise AgiConnectionLost("AGI connection closed", partial=bool(raw))
        return raw

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):  # TimeoutError is an OSError
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")


# --- one call -------------------------------------------------------------------


class AgiSession:
    """One call over one AGI connection, driving one :class:`CallFlow`."""

    def __init__(self, server: AgiServer, conn: AgiConnection, flow: Flow, info: CallInfo,
                 language: str) -> None:
        self.server = server
        self.conn = conn
        self.info = info
        self.machine = CallFlow(flow, info, str(server.settings.recordings.dir))
        self._channel_language = language
        self._menu_deadline: float | None = None  # monotonic
        self._hard_deadline = time.monotonic() + flow.max_menu_seconds + HARD_MARGIN

    @property
    def clock(self) -> Clock:
        return self.server.clock

    async def run(self) -> None:
        try:
            await self.feed(CallStarted(self.clock()))
            if self.machine.phase is not Phase.DONE:
                # Every path through the flow ends in DONE; if not, end it as a failure.
                log.error("call %s: the flow stopped in %s", self.info.call_id,
                          self.machine.phase)
                await self.feed(Failed(f"AGI session stalled in {self.machine.phase}",
                                       self.clock()))
        except Exception:  # one call's bug must never reach the server
            log.exception("call %s: internal error; the call is not recorded",
                          self.info.call_id)

    async def feed(self, event: Event) -> None:
        pending: deque[Event] = deque([event])
        while pending:
            for command in self.machine.handle(pending.popleft()):
                result = await self.execute(command)
                if result is not None:
                    pending.append(result)
                    if isinstance(result, Failed | HungUp):
                        break  # the rest of this batch is moot; the flow re-plans

    async def execute(self, command: Command) -> Event | None:
        try:
            match command:
                case Answer():
                    return await self._checked(await self.conn.command("ANSWER"), "ANSWER")
                case Play(playback_id=pid, media=media, language=language):
                    return await self._play(pid, media, language)
                case StartTimer(timer_id=tid, seconds=seconds):
                    if tid == MENU_DEADLINE:
                        self._menu_deadline = time.monotonic() + seconds
                        return None
                    return await self._wait_for_digit(tid, seconds)
                case CancelTimer(timer_id=tid):
                    if tid == MENU_DEADLINE:
                        self._menu_deadline = None
                case StopPlayback():
                    pass  # AGI plays synchronously: nothing is playing now
                case LogDecision(record=record):
                    return await self._log_decision(record)
                case StartRecording(path=path):
                    return await self._start_recording(path)
                case MarkRecording(call_id=call_id, confirmed=confirmed, error=error):
                    # A status of a decision already committed: the caller does not
                    # wait for its fsync; a failure is logged when it happens.
                    self._write_later("mark_recording",
                                      (call_id, confirmed, error, self.clock()))
                case SetVariables(variables=variables):
                    # The prompts already put the channel in this language.
                    variables = tuple(p for p in variables if p != (
                        "CHANNEL(language)", self._channel_language))
                    for name, value in assignments(variables):
                        hung = self._hung_up(await self.conn.command("SET VARIABLE", name, value))
                        if hung:
                            return hung
                case Continue(destination=d):
                    for words, arg in (("SET CONTEXT", d.context), ("SET EXTENSION", d.exten),
                                       ("SET PRIORITY", str(d.priority))):
                        event = await self._checked(await self.conn.command(words, arg), words)
                        if event is not None:
                            return event
                case Hangup():
                    await self.conn.command("HANGUP")
        except AgiConnectionLost:
            return HungUp(self.clock())
        except AgiError as exc:
            log.warning("call %s: %s", self.info.call_id, exc)
            return Failed(str(exc), self.clock())
        return None

    # -- playing and waiting -------------------------------------------------

    def _blocking_timeout(self) -> float:
        return max(1.0, self._hard_deadline - time.monotonic())

    def _deadline_passed(self) -> TimerFired | None:
        if self._menu_deadline is not None and time.monotonic() >= self._menu_deadline:
            return TimerFired(MENU_DEADLINE, self.clock())
        return None

    async def _play(self, pid: str, media: tuple[str, ...], language: str) -> Event:
        await self._use_language(language)
        for uri in media:
            if late := self._deadline_passed():
                return late
            scheme, _, name = uri.partition(":")
            words = _PLAYERS.get(scheme)
            if words is None or not name:
                return Failed(f"AGI mode cannot play {uri!r} (use sound:, digits:, number: "
                              "or characters:)", self.clock())
            reply = await self.conn.command(words, name, ESCAPE_DIGITS,
                                            timeout=self._blocking_timeout())
            event = await self._digit_or_end(reply, f"{words} {name}")
            if event is not None:
                return event
        return self._deadline_passed() or PlaybackFinished(pid, self.clock())

    async def _wait_for_digit(self, tid: str, seconds: float) -> Event:
        wait, fired = seconds, tid
        if self._menu_deadline is not None:
            left = self._menu_deadline - time.monotonic()
            if left <= 0:
                return TimerFired(MENU_DEADLINE, self.clock())
            if left < seconds:
                wait, fired = left, MENU_DEADLINE
        ms = max(1, math.ceil(wait * 1000))
        reply = await self.conn.command("WAIT FOR DIGIT", str(ms),
                                        timeout=self._blocking_timeout())
        event = await self._digit_or_end(reply, "WAIT FOR DIGIT")
        return event or TimerFired(fired, self.clock())

    async def _digit_or_end(self, reply: Reply, what: str) -> Event | None:
        """A digit, a hang-up, a failure, or None when the command simply ended."""
        event = await self._checked(reply, what)
        if event is not None or not reply.result:
            return event
        digit = chr(reply.result) if 0 < reply.result < 0x110000 else ""
        if digit not in DTMF_KEYS:
            return Failed(f"AGI {what}: unexpected result {reply.result}", self.clock())
        return self._deadline_passed() or DigitPressed(digit, self.clock())

    def _hung_up(self, reply: Reply) -> HungUp | None:
        return HungUp(self.clock()) if self.conn.hung_up or reply.code == _DEAD else None

    async def _checked(self, reply: Reply, what: str) -> Event | None:
        """HungUp / Failed for a reply that is not a success, else None."""
        if hung := self._hung_up(reply):
            return hung
        if reply.code != 200:
            log.warning("call %s: AGI rejected %s: %s", self.info.call_id, what, reply.text)
            return Failed(f"AGI {what}: {reply.text}", self.clock())
        if reply.result is not None and reply.result < 0:
            # -1 is both "hung up" and "failed" (a missing sound file): ask the channel.
            status = await self.conn.command("CHANNEL STATUS")
            if hung := self._hung_up(status):
                return hung
            return Failed(f"AGI {what} failed", self.clock())
        return None

    async def _use_language(self, language: str) -> None:
        """Sounds follow the channel's language; ARI passes it per playback instead.

        It is not set back afterwards: the flow's SetVariables leaves the channel in
        the caller's language for the rest of the dialplan, in both modes.
        """
        if language and language != self._channel_language:
            await self.conn.command("SET VARIABLE", "CHANNEL(language)", language)
            self._channel_language = language

    # -- recording and the consent log -------------------------------------------

    async def _start_recording(self, path: str) -> RecordingStarted:
        if not _SAFE_PATH.fullmatch(path):
            return RecordingStarted(False, self.clock(),
                                    f"recording path {path!r} has characters MixMonitor splits on")
        options = self.server.settings.recordings.options
        try:
            reply = await self.conn.command("EXEC", "MixMonitor",
                                            f"{path},{options}" if options else path)
        except AgiError as exc:
            return RecordingStarted(False, self.clock(), str(exc))
        if reply.code == 200 and reply.result == 0:
            return RecordingStarted(True, self.clock())
        error = ("MixMonitor is not available in this Asterisk" if reply.result == -2
                 else f"MixMonitor: {reply.text}")
        log.warning("call %s: recording not confirmed: %s", self.info.call_id, error)
        return RecordingStarted(False, self.clock(), error)

    def _settle_late(self, record: DecisionRecord, future: Future[None]) -> None:
        """The row we stopped waiting for landed after all (committer thread): the
        call went on told "error", so nothing in the row may be acted on."""
        if not future.cancelled() and future.exception() is None and (
                record.recording_path is not None or record.callback_until is not None):
            self.server.committer.submit("void_late_consent", (
                record.call_id, "decision committed after the call went on", time.time()))

    def _write_later(self, kind: str, payload: Any) -> None:
        call_id = self.info.call_id

        def done(future: Future[None]) -> None:  # on the committer's thread
            exc = None if future.cancelled() else future.exception()
            if exc is not None:
                log.error("call %s: consent log: %s not written: %s", call_id, kind, exc)

        self.server.committer.submit(kind, payload).add_done_callback(done)

    async def _log_decision(self, record: DecisionRecord) -> DecisionLogged:
        future = self.server.committer.submit("append", record)
        try:
            # shield: the committer thread still owns the future after we stop waiting.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                   self.server.log_timeout)
        except TimeoutError:
            log.error("call %s: decision not committed within %gs, call goes on unrecorded",
                      self.info.call_id, self.server.log_timeout)
            if record.recording_path:
                future.add_done_callback(lambda f: self._settle_late(record, f))
            return DecisionLogged(False, self.clock(), "consent log did not commit in time")
        except ConsentivrError as exc:
            log.error("call %s: decision NOT logged, call goes on unrecorded: %s",
                      self.info.call_id, exc)
            return DecisionLogged(False, self.clock(), str(exc))
        decisions = " ".join(f"{k}={v}" for k, v in record.decisions.items())
        log.info("decision call=%s flow=%s lang=%s notice=%s %s outcome=%s",
                 record.call_id, record.flow, record.language, record.notice_version,
                 decisions, record.outcome)
        return DecisionLogged(True, self.clock())


# --- the server -------------------------------------------------------------------


class AgiServer:
    """A FastAGI server: one :class:`AgiSession` per connection, routed by flow name."""

    def __init__(self, settings: Settings, committer: Committer, clock: Clock = time.time,
                 env_timeout: float = ENV_TIMEOUT, log_timeout: float = LOG_TIMEOUT) -> None:
        self.settings = settings
        self.committer = committer
        self.clock = clock
        self.env_timeout = env_timeout
        self.log_timeout = log_timeout
        self.sessions: dict[str, AgiSession] = {}  # by agi_uniqueid
        self.tasks: set[asyncio.Task[None]] = set()
        self.rejected = 0  # connections closed without a session (empty, malformed)
        self._server: asyncio.Server | None = None

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen (port 0: any free port) and return the bound address."""
        try:
            self._server = await asyncio.start_server(self._accept, host, port,
                                                      limit=LINE_LIMIT)
        except OSError as exc:
            raise AgiError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        address = self.address
        log.info("consentivr FastAGI listening on %s:%d with flows: %s", *address,
                 ", ".join(self.settings.flows))
        return address

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        conn, peer = AgiConnection(reader, writer), writer.get_extra_info("peername")
        try:
            await self._serve(conn, peer)
        except Exception:  # never let one connection's bug reach the server
            log.exception("AGI connection from %s: internal error", peer)
        finally:
            await conn.close()

    async def _serve(self, conn: AgiConnection, peer: object) -> None:
        try:
            env = await conn.read_environment(self.env_timeout)
        except AgiConnectionLost:
            self.rejected += 1
            log.debug("AGI connection from %s closed before an environment", peer)
            return
        except AgiError as exc:
            self.rejected += 1
            log.warning("AGI connection from %s dropped: %s", peer, exc)
            return
        uniqueid, name = env["agi_uniqueid"], flow_name(env)
        flow = self.settings.flow_for(name)
        if flow is None:
            log.error("channel %s: unknown flow %r; not recorded, back to the dialplan",
                      env["agi_channel"], name)
            # CONSENTIVR_LOGGED stays unset, so a rendered dialplan runs its fallback.
            with contextlib.suppress(AgiError):
                await conn.command("SET VARIABLE", "CONSENTIVR_RECORDING", "no")
            return
        if uniqueid in self.sessions:
            log.error("channel %s: already in a session; refusing a second one", uniqueid)
            return
        info = CallInfo(
            call_id=uuid.uuid4().hex,
            channel_id=uniqueid,
            linkedid=_linkedid_arg(env) or await self._linkedid(conn, uniqueid),
            channel_name=env["agi_channel"],
            caller=_caller(env.get("agi_callerid", "")),
        )
        session = AgiSession(self, conn, flow, info, env.get("agi_language", ""))
        self.sessions[uniqueid] = session
        try:
            await session.run()
        finally:
            self.sessions.pop(uniqueid, None)

    @staticmethod
    async def _linkedid(conn: AgiConnection, uniqueid: str) -> str:
        """No linkedid among the AGI arguments (a hand-written ``AGI()``): ask for it
        (one round trip)."""
        try:
            reply = await conn.command("GET VARIABLE", "CHANNEL(linkedid)")
        except AgiError:
            return uniqueid  # the flow finds out about the connection itself
        return (reply.data or uniqueid) if reply.result == 1 else uniqueid

    async def stop(self, drain: float = 10.0) -> None:
        """Stop listening; give calls in the menu ``drain`` seconds, then cut them off.

        A cut-off call returns to the dialplan, whose fallback goes on unrecorded.
        """
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d call(s) still in the menu were cut off", len(pending))
                await asyncio.wait(pending, timeout=5)


def _linkedid_arg(env: Mapping[str, str]) -> str | None:
    """The linkedid the rendered dialplan passes as the first AGI argument
    (``AGI(agi://.../<flow>,${CHANNEL(linkedid)})``), if it looks like one."""
    return clean_id(env.get("agi_arg_1"))


def _caller(callerid: str) -> str | None:
    """Asterisk writes 'unknown' when there is no caller number."""
    return None if callerid in ("", "unknown") else callerid


async def serve(settings: Settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                stop: asyncio.Event | None = None) -> None:
    """Run the FastAGI server until ``stop`` is set (or SIGTERM/SIGINT)."""
    from consentivr.service import prepare_paths
    from consentivr.store import ConsentLog, GroupCommitter, load_or_create_key

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    prepare_paths(settings)
    key = load_or_create_key(settings.database, settings.caller_key)
    path = settings.database
    committer = GroupCommitter(lambda: ConsentLog(path, key))
    server = AgiServer(settings, committer)
    try:
        await server.start(host, port)
        await stop.wait()
        log.info("stopping: waiting for calls in the menu")
        await server.stop()
    finally:
        committer.close()
