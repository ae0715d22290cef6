"""The ARI (Stasis) adapter: runs one pure :class:`~consentivr.flow.CallFlow` per call.

It maps ARI events to flow events, and flow commands to ARI/AMI/SQLite calls,
feeding the results back. It makes no decisions of its own: when anything of
ours fails, it tells the flow (``Failed``, ``DecisionLogged(ok=False)``,
``RecordingStarted(ok=False)``) and the flow keeps the call unrecorded. One
call's failure ends that call, never the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
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
from consentivr.model import Flow

log = logging.getLogger(__name__)
Clock = Callable[[], float]


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
    async def continue_in_dialplan(self, channel_id: str, context: str = "",
                                   extension: str = "", priority: int = 0) -> None: ...
    async def hangup(self, channel_id: str) -> None: ...


class CallSession:
    """One call: a queue of events and the task that drives its flow."""

    def __init__(self, app: ConsentApp, flow: Flow, info: CallInfo) -> None:
        self.app = app
        self.info = info
        self.machine = CallFlow(flow, info, str(app.settings.recordings.dir))
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}

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
                    await app.ari.play(ch, pid, media, language)
                case StopPlayback(playback_id=pid):
                    # Harmless if it fails (the prompt may have just ended): never
                    # let it cut short the batch that logs the decision.
                    try:
                        await app.ari.stop_playback(pid)
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
                    await self._write("mark_recording", (call_id, confirmed, error, app.clock()))
                case SetVariables(variables=variables):
                    await asyncio.gather(*(app.ari.set_variable(ch, k, v) for k, v in variables))
                case Continue(destination=d):
                    await app.ari.continue_in_dialplan(ch, d.context, d.exten, d.priority)
                case Hangup():
                    await app.ari.hangup(ch)
        except ConsentivrError as exc:
            log.warning("call %s: %s", self.info.call_id, exc)
            return Failed(str(exc), app.clock())
        return None

    async def _write(self, kind: str, payload: Any) -> None:
        try:
            await asyncio.wrap_future(self.app.committer.submit(kind, payload))
        except ConsentivrError as exc:
            log.error("call %s: consent log: %s", self.info.call_id, exc)

    async def _log_decision(self, record: Any) -> Event:
        try:
            await asyncio.wrap_future(self.app.committer.submit("append", record))
        except ConsentivrError as exc:
            log.error("call %s: decision NOT logged, call goes on unrecorded: %s",
                      self.info.call_id, exc)
            return DecisionLogged(False, self.app.clock(), str(exc))
        decisions = " ".join(f"{k}={v}" for k, v in record.decisions.items())
        log.info("decision call=%s flow=%s lang=%s notice=%s %s outcome=%s",
                 record.call_id, record.flow, record.language, record.notice_version,
                 decisions, record.outcome)
        return DecisionLogged(True, self.app.clock())


class ConsentApp:
    """Routes this Stasis app's events to one :class:`CallSession` per channel."""

    def __init__(self, settings: Settings, ari: AriLike, recorder: RecorderLike,
                 committer: Committer, clock: Clock = time.time) -> None:
        self.settings = settings
        self.ari = ari
        self.recorder = recorder
        self.committer = committer
        self.clock = clock
        self.sessions: dict[str, CallSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def handle_event(self, event: dict[str, Any]) -> None:
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
            digit = str(event.get("digit", ""))
            if len(digit) == 1:
                session.push(DigitPressed(digit, at))
        elif kind == "PlaybackFinished":
            session.push(PlaybackFinished(str(event["playback"].get("id", "")), at))
        elif kind in ("StasisEnd", "ChannelHangupRequest", "ChannelDestroyed"):
            session.push(HungUp(at))

    def _start(self, event: dict[str, Any]) -> None:
        channel = event.get("channel") or {}
        channel_id = str(channel.get("id", ""))
        if not channel_id or channel_id in self.sessions:
            return
        args = event.get("args") or []
        flow = self.settings.flow_for(str(args[0]) if args else None)
        if flow is None:
            log.error("channel %s: unknown flow %r; not recorded, leaving our app",
                      channel_id, args[0] if args else None)
            self._spawn(self._leave_unknown(channel_id))
            return
        caller = channel.get("caller") or {}
        info = CallInfo(
            call_id=uuid.uuid4().hex,
            channel_id=channel_id,
            linkedid=str(channel.get("linkedid") or channel_id),
            channel_name=str(channel.get("name", "")),
            caller=str(caller.get("number") or "") or None,
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
            await self.ari.set_variable(channel_id, "CONSENTIVR_RECORDING", "no")
            await self.ari.set_variable(channel_id, "CONSENTIVR_LOGGED", "no")
            await self.ari.continue_in_dialplan(channel_id)
        except ConsentivrError as exc:
            log.warning("channel %s: %s", channel_id, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Wait for calls in progress to finish their menu (on shutdown)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


def _channel_id(event: dict[str, Any]) -> str | None:
    if "channel" in event:
        return str(event["channel"].get("id", ""))
    playback = event.get("playback")
    if playback:
        target = str(playback.get("target_uri", ""))
        if target.startswith("channel:"):
            return target.removeprefix("channel:")
    return None
