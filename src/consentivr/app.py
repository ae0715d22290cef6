"""The ARI (Stasis) adapter: runs one pure :class:`~consentivr.flow.CallFlow` per call.

It maps ARI events to flow events, and flow commands to ARI/AMI/SQLite calls,
feeding the results back. It makes no decisions of its own: when anything of
ours fails, it tells the flow (``Failed``, ``DecisionLogged(ok=False)``,
``RecordingStarted(ok=False)``) and the flow keeps the call unrecorded. One
call's failure ends that call, never the service.

Channel data (ids, names, caller numbers) is untrusted: it is cleaned here
(:func:`clean`) and only ever reaches ARI paths quoted, AMI fields without line
breaks, and SQL as parameters. Recording file names are our own call ids.

After an events (re)connect, :meth:`ConsentApp.reconcile` takes back calls left
in Stasis (see :mod:`consentivr.recovery`). A decision the log could not take
while the call went on is written later by :class:`LateLog`, as what was acted
on: every purpose ``error``, nothing recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from consentivr.config import Settings
from consentivr.errors import ConsentivrError
from consentivr.flow import (
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
from consentivr.model import Decision, Flow
from consentivr.recovery import ChannelRecovery, Lookup, playback_id

log = logging.getLogger(__name__)
Clock = Callable[[], float]

# How long a call waits for its decision to be committed before it goes on
# unrecorded (a locked database waits up to its busy timeout, 5 s, per batch).
DECISION_TIMEOUT = 6.0
MAX_TEXT = 256  # longest channel name / caller number we keep
MAX_ID = 150  # Asterisk ids are at most 149 characters
# The only ARI event types handle_event reads: the service asks Asterisk for these
# alone (an event filter), which halves the events per call.
EVENT_TYPES = ("StasisStart", "StasisEnd", "ChannelDtmfReceived", "PlaybackFinished",
               "ChannelHangupRequest", "ChannelDestroyed")


def clean(value: object, limit: int = MAX_TEXT) -> str:
    """Untrusted channel text: no NUL, no lone surrogates (SQLite and HMAC reject
    them), at most ``limit`` characters."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = text.replace("\0", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def clean_id(value: object) -> str | None:
    """An Asterisk id from an event, or None if it cannot be one (then the event is ignored)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    text = str(value)
    if not text or len(text) > MAX_ID or not text.isprintable() or not text.strip("."):
        return None
    if text != clean(text):
        return None
    return text


class Committer(Protocol):
    def submit(self, kind: str, payload: Any) -> Future[None]: ...


class RecorderLike(Protocol):
    async def start(self, channel: str, path: str, options: str) -> None: ...


class AriLike(Protocol):
    async def answer(self, channel_id: str) -> None: ...
    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None: ...
    async def stop_playback(self, playback_id: str) -> None: ...
    async def set_variable(self, channel_id: str, name: str, value: str) -> None: ...
    async def set_variables(self, channel_id: str,
                            pairs: Sequence[tuple[str, str]]) -> None: ...
    async def continue_in_dialplan(self, channel_id: str, context: str = "",
                                   extension: str = "", priority: int = 0) -> None: ...
    async def hangup(self, channel_id: str) -> None: ...
    async def channel(self, channel_id: str) -> dict[str, Any] | None: ...
    async def application(self, app: str) -> dict[str, Any] | None: ...
    async def get_variable(self, channel_id: str, name: str) -> str | None: ...


class CallSession:
    """One call: a queue of events and the task that drives its flow."""

    def __init__(self, app: ConsentApp, flow: Flow, info: CallInfo) -> None:
        self.app = app
        self.info = info
        self.machine = CallFlow(flow, info, str(app.settings.recordings.dir))
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # ARI playback ids are derived from the channel id (see recovery.playback_id),
        # so that a restarted consentivr can stop a prompt its predecessor started.
        self._to_ari: dict[str, str] = {}
        self._from_ari: dict[str, str] = {}

    def _ari_playback(self, flow_id: str) -> str:
        ari_id = playback_id(self.channel_id, len(self._to_ari) + 1)
        self._to_ari[flow_id] = ari_id
        self._from_ari[ari_id] = flow_id
        return ari_id

    def playback_finished(self, ari_id: str, at: float) -> None:
        self.push(PlaybackFinished(self._from_ari.get(ari_id, ari_id), at))

    @property
    def channel_id(self) -> str:
        return self.info.channel_id

    def push(self, event: Event) -> None:
        self.queue.put_nowait(event)

    async def run(self) -> None:
        self.push(CallStarted(self.app.clock()))
        # Safety net beyond the flow's own menu deadline: no wait is unbounded.
        limit = self.machine.flow.max_menu_seconds + 30
        try:
            while self.machine.phase is not Phase.DONE:
                try:
                    event = await asyncio.wait_for(self.queue.get(), limit)
                except TimeoutError:
                    event = Failed("no event within the call's time limit", self.app.clock())
                await self.feed(event)
        except Exception:  # one call's bug must never reach the service
            log.exception("call %s: internal error; the call is not recorded", self.info.call_id)
            await self._bail_out()
        finally:
            for handle in self._timers.values():
                handle.cancel()

    async def feed(self, event: Event) -> None:
        pending: deque[Event] = deque([event])
        while pending:
            for command in self.machine.handle(pending.popleft()):
                result = await self.execute(command)
                if result is not None:
                    pending.append(result)
                    if isinstance(result, Failed):
                        break  # the rest of this batch is moot; the flow re-plans

    async def _bail_out(self) -> None:
        if self.machine.phase is Phase.DONE:
            return
        with contextlib.suppress(ConsentivrError):
            await self.app.ari.hangup(self.channel_id)

    async def execute(self, command: Command) -> Event | None:
        app, ch = self.app, self.channel_id
        try:
            match command:
                case Answer():
                    await app.ari.answer(ch)
                case Play(playback_id=pid, media=media, language=language):
                    await app.ari.play(ch, self._ari_playback(pid), media, language)
                case StopPlayback(playback_id=pid):
                    # Harmless if it fails (the prompt may have just ended): never
                    # let it cut short the batch that logs the decision.
                    try:
                        await app.ari.stop_playback(self._to_ari.get(pid, pid))
                    except ConsentivrError as exc:
                        log.debug("call %s: stop playback: %s", self.info.call_id, exc)
                case StartTimer(timer_id=tid, seconds=seconds):
                    self._timers[tid] = asyncio.get_running_loop().call_later(
                        seconds, lambda: self.push(TimerFired(tid, app.clock())))
                case CancelTimer(timer_id=tid):
                    handle = self._timers.pop(tid, None)
                    if handle:
                        handle.cancel()
                case LogDecision(record=record):
                    return await self._log_decision(record)
                case StartRecording(path=path):
                    try:
                        await app.recorder.start(self.info.channel_name, path,
                                                 app.settings.recordings.options)
                    except ConsentivrError as exc:
                        log.warning("call %s: recording not confirmed: %s",
                                    self.info.call_id, exc)
                        return RecordingStarted(False, app.clock(), str(exc))
                    return RecordingStarted(True, app.clock())
                case MarkRecording(call_id=call_id, confirmed=confirmed, error=error):
                    # A status of a decision already committed: the caller does not
                    # wait for its fsync (a failed write is retried by LateLog).
                    app._spawn(self._write("mark_recording",
                                           (call_id, confirmed, error, app.clock())))
                case SetVariables(variables=variables):
                    await app.ari.set_variables(ch, variables)
                case Continue(destination=d):
                    await app.ari.continue_in_dialplan(ch, d.context, d.exten, d.priority)
                case Hangup():
                    await app.ari.hangup(ch)
        except ConsentivrError as exc:
            log.warning("call %s: %s", self.info.call_id, exc)
            return Failed(str(exc), app.clock())
        return None

    async def _write(self, kind: str, payload: Any) -> None:
        if not await self.app.durable(kind, payload):
            log.error("call %s: consent log: %s not written yet; will retry",
                      self.info.call_id, kind)

    async def _log_decision(self, record: DecisionRecord) -> Event:
        app = self.app
        if not await app.durable("append", record):
            log.error("call %s: decision NOT logged, call goes on unrecorded",
                      self.info.call_id)
            return DecisionLogged(False, app.clock(), "consent log unavailable")
        decisions = " ".join(f"{k}={v}" for k, v in record.decisions.items())
        log.info("decision call=%s flow=%s lang=%s notice=%s %s outcome=%s",
                 record.call_id, record.flow, record.language, record.notice_version,
                 decisions, record.outcome)
        return DecisionLogged(True, app.clock())


def acted_on_unlogged(record: DecisionRecord, why: str) -> DecisionRecord:
    """The row for a call that went on before its decision was committed.

    The call was told nothing is allowed (every purpose ``error``, no recording), so
    that is what the row says; the keys pressed stay, as evidence.
    """
    return dataclasses.replace(
        record,
        decisions={name: Decision.ERROR for name in record.decisions},
        recording_path=None, recording_until=None, callback_until=None,
        outcome=f"error: not logged before the call went on ({clean(why, 120)})",
    )


class LateLog:
    """Writes that failed while the call went on, retried until the log takes them.

    Held in memory only: a crash loses them (the call is unrecorded either way).
    """

    def __init__(self, committer: Committer, max_delay: float = 30.0) -> None:
        self.committer = committer
        self.max_delay = max_delay
        self.pending: deque[tuple[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self.written = 0

    def add(self, kind: str, payload: Any) -> None:
        self.pending.append((kind, payload))
        self._wake.set()

    def settle_timed_out(self, record: DecisionRecord, future: Future[None]) -> None:
        """A decision write we stopped waiting for has finished after all."""
        if future.exception() is None:
            if record.recording_path is None and record.callback_until is None:
                return
            # The row allows processing, but the call went on told "error": void it.
            self.add("void_late_consent", (record.call_id,
                                           "decision committed after the call went on",
                                           time.time()))
        else:
            self.add("append", acted_on_unlogged(record, str(future.exception())))

    async def run(self) -> None:
        delay = 1.0
        while True:
            await self._wake.wait()
            while self.pending:
                kind, payload = self.pending[0]
                try:
                    await asyncio.shield(asyncio.wrap_future(
                        self.committer.submit(kind, payload)))
                except ConsentivrError as exc:
                    if kind == "append" and "UNIQUE" in str(exc):
                        self.pending.popleft()  # it did land after all
                        continue
                    log.warning("consent log still failing (%s); %d late write(s) "
                                "retried in %.0fs", exc, len(self.pending), delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry_now.wait(), delay)
                    self._retry_now.clear()
                    delay = min(delay * 2, self.max_delay)
                    continue
                except Exception:  # a bug: never retry it forever
                    log.exception("late %s write dropped", kind)
                    self.pending.popleft()
                    continue
                self.pending.popleft()
                self.written += 1
                delay = 1.0
                log.info("late %s write landed in the consent log", kind)
            self._wake.clear()

    async def flush(self, timeout: float) -> None:
        """On shutdown: try once more to write what is pending."""
        self._retry_now.set()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.pending:
            log.error("%d consent log write(s) lost at shutdown: the log was unavailable",
                      len(self.pending))


class ConsentApp:
    """Routes this Stasis app's events to one :class:`CallSession` per channel."""

    def __init__(self, settings: Settings, ari: AriLike, recorder: RecorderLike,
                 committer: Committer, clock: Clock = time.time,
                 lookup: Lookup | None = None,
                 decision_timeout: float = DECISION_TIMEOUT) -> None:
        self.settings = settings
        self.ari = ari
        self.recorder = recorder
        self.committer = committer
        self.clock = clock
        self.lookup = lookup
        self.decision_timeout = decision_timeout
        self.sessions: dict[str, CallSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.recovering: set[str] = set()
        self.recovered: list[Any] = []  # recovery outcomes, newest last (bounded)
        self.late = LateLog(committer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._late_task: asyncio.Task[None] | None = None

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop, from any thread (committer callbacks)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def start_background(self) -> None:
        """Start the late-write task; called once the event loop runs."""
        self._loop = asyncio.get_running_loop()
        self._late_task = self._loop.create_task(self.late.run())

    def handle_event(self, event: dict[str, Any]) -> None:
        if not isinstance(event, dict):
            return
        if self._loop is None:
            self.start_background()
        kind = event.get("type")
        if kind == "StasisStart":
            self._start(event)
            return
        channel_id = _channel_id(event)
        session = self.sessions.get(channel_id) if channel_id else None
        if session is None:
            return
        at = self.clock()
        if kind == "ChannelDtmfReceived":
            digit = event.get("digit")
            if isinstance(digit, str) and len(digit) == 1:
                session.push(DigitPressed(digit, at))
        elif kind == "PlaybackFinished":
            playback = _mapping(event.get("playback"))
            session.playback_finished(clean(playback.get("id", "")), at)
        elif kind in ("StasisEnd", "ChannelHangupRequest", "ChannelDestroyed"):
            session.push(HungUp(at))

    def _start(self, event: dict[str, Any]) -> None:
        channel = _mapping(event.get("channel"))
        channel_id = clean_id(channel.get("id"))
        if channel_id is None:
            log.warning("StasisStart without a usable channel id; ignored")
            return
        if channel_id in self.sessions or channel_id in self.recovering:
            return
        args = event.get("args")
        args = args if isinstance(args, list) else []
        flow_name = clean(args[0], 64) if args else None
        flow = self.settings.flow_for(flow_name)
        if flow is None:
            log.error("channel %r: unknown flow %r; not recorded, leaving our app",
                      channel_id, flow_name)
            self._spawn(self._leave_unknown(channel_id))
            return
        caller = _mapping(channel.get("caller"))
        info = CallInfo(
            call_id=uuid.uuid4().hex,
            channel_id=channel_id,
            linkedid=clean_id(channel.get("linkedid")) or channel_id,
            channel_name=clean(channel.get("name", "")),
            caller=clean(caller.get("number")) or None,
        )
        session = CallSession(self, flow, info)
        self.sessions[channel_id] = session
        self._spawn(self._run_session(session))

    async def _run_session(self, session: CallSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.pop(session.channel_id, None)

    async def _leave_unknown(self, channel_id: str) -> None:
        try:
            await self.ari.set_variables(channel_id, (("CONSENTIVR_RECORDING", "no"),
                                                      ("CONSENTIVR_LOGGED", "no")))
            await self.ari.continue_in_dialplan(channel_id)
        except ConsentivrError as exc:
            log.warning("channel %r: %s", channel_id, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def durable(self, kind: str, payload: Any, timeout: float | None = None) -> bool:
        """Write to the consent log; on failure queue a late write. True if committed now."""
        future = self.committer.submit(kind, payload)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                   timeout or self.decision_timeout)
        except TimeoutError:
            log.error("consent log: %s not committed within %gs", kind,
                      timeout or self.decision_timeout)
            if kind == "append":
                future.add_done_callback(
                    lambda f: self.call_soon(self.late.settle_timed_out, payload, f))
            else:
                future.add_done_callback(
                    lambda f: f.exception() is not None and self.call_soon(
                        self.late.add, kind, payload))
            return False
        except ConsentivrError as exc:
            log.error("consent log: %s failed: %s", kind, exc)
            self.late.add(kind, acted_on_unlogged(payload, str(exc))
                          if kind == "append" else payload)
            return False
        return True

    # -- recovery ----------------------------------------------------------

    def events_connected(self) -> None:
        """The events websocket is (re)connected: reconcile in the background, so that
        events flow meanwhile."""
        if self._loop is None:
            self.start_background()
        self._spawn(self.reconcile())

    async def reconcile(self, settle: float = 0.3) -> None:
        """After an events (re)connect: take back calls left in our app, and end
        sessions whose channel vanished while we were not listening."""
        if self._loop is None:
            self.start_background()
        # StasisStart events queued on the new websocket are handled first.
        await asyncio.sleep(settle)
        data: dict[str, Any] | None = None
        for attempt in range(3):
            try:
                data = await self.ari.application(self.settings.ari.app)
                break
            except ConsentivrError as exc:
                if attempt == 2:
                    log.error("recovery: cannot list the channels in our app: %s", exc)
                    return
                await asyncio.sleep(0.5)
        ids = {i for i in (clean_id(x) for x in _list(_mapping(data).get("channel_ids")))
               if i is not None}
        orphans = ids - set(self.sessions) - self.recovering
        if orphans:
            log.warning("recovery: taking back %d call(s) left in Stasis", len(orphans))
        for channel_id in sorted(orphans):
            self.recovering.add(channel_id)
            self._spawn(self._recover(channel_id))
        for channel_id, session in list(self.sessions.items()):
            if channel_id not in ids:
                self._spawn(self._check_alive(session))

    async def _check_alive(self, session: CallSession) -> None:
        try:
            alive = await self.ari.channel(session.channel_id) is not None
        except ConsentivrError:
            return
        if not alive:
            session.push(HungUp(self.clock()))

    async def _recover(self, channel_id: str) -> None:
        recovery = ChannelRecovery(
            flows=self.settings.flow_for, ari=self.ari,
            recorder=self.recorder, lookup=self.lookup, write=self.durable,
            recordings_dir=str(self.settings.recordings.dir),
            recording_options=self.settings.recordings.options,
            mode=getattr(self.settings, "recovery", "continue"), clock=self.clock,
        )
        try:
            outcome = await recovery.run(channel_id, sanitize=clean)
            log.warning("recovery: channel %r %s (logged=%s, resumed=%s, recording=%s)",
                        channel_id, outcome.action, outcome.logged, outcome.resumed,
                        outcome.recording)
        except Exception as exc:  # never leave the caller stuck in our app
            if not isinstance(exc, ConsentivrError):
                log.exception("recovery: channel %r: internal error", channel_id)
            else:
                log.error("recovery: channel %r: %s; hanging up", channel_id, exc)
            with contextlib.suppress(ConsentivrError):
                await self.ari.hangup(channel_id)
            outcome = None
        finally:
            self.recovering.discard(channel_id)
        self.recovered.append(outcome)
        del self.recovered[:-1000]

    async def drain(self, timeout: float) -> None:
        """Wait for calls in progress to finish their menu (on shutdown)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """After :meth:`drain`: give late writes a last chance, then stop their task."""
        if self._late_task is None:
            return
        await self.late.flush(timeout)
        self._late_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._late_task


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _channel_id(event: dict[str, Any]) -> str | None:
    if "channel" in event:
        return clean_id(_mapping(event["channel"]).get("id"))
    playback = _mapping(event.get("playback"))
    target = playback.get("target_uri")
    if isinstance(target, str) and target.startswith("channel:"):
        return clean_id(target.removeprefix("channel:"))
    return None
