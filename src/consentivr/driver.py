"""The one call driver: feeds events to the pure flow and runs its commands.

Both modes run every call through :class:`CallDriver`; an adapter only provides a
:class:`Transport` for one channel (ARI: :mod:`consentivr.stasis`; FastAGI:
:mod:`consentivr.agi.transport`). The driver owns:

- the loop that feeds events to :class:`~consentivr.flow.CallFlow` and runs the
  commands it returns, feeding results back in order;
- the safety net: no wait is unbounded (``max_menu_seconds`` + :data:`SAFETY_MARGIN`),
  a transport that stalls ends the call as a failure, and one call's bug ends that
  call (unrecorded, hung up), never the service;
- the consent log, through one :class:`~consentivr.consentwriter.ConsentWriter`.

It decides nothing about consent: every decision is the flow's. A transport error
(:class:`~consentivr.errors.ConsentivrError`) becomes ``Failed``, a vanished channel
(:class:`~consentivr.errors.ChannelGone`) becomes ``HungUp``, and the flow says what
follows.

Channel data (ids, names, caller numbers) is untrusted: :func:`call_info` cleans it
before it reaches the flow, the log or Asterisk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import Protocol

from consentivr.consentwriter import ConsentWriter
from consentivr.errors import ChannelGone, ConsentivrError
from consentivr.flow import CallFlow, Phase, unknown_flow
from consentivr.messages import (
    Answer,
    ArmDeadline,
    CallInfo,
    CallStarted,
    CancelTimer,
    Clock,
    Command,
    Continue,
    DisarmDeadline,
    Event,
    Failed,
    Hangup,
    HungUp,
    LogDecision,
    MarkRecording,
    Play,
    RecordingStarted,
    SetVariables,
    StartRecording,
    StartTimer,
    StopPlayback,
)
from consentivr.model import Destination, Flow
from consentivr.withdrawalpath import RecordingGate

log = logging.getLogger(__name__)

SAFETY_MARGIN = 30.0  # beyond the flow's own menu deadline, no call waits longer
MAX_TEXT = 256  # longest channel name / caller number we keep
MAX_ID = 150  # Asterisk ids are at most 149 characters


class Transport(Protocol):
    """One channel, as a mode reaches it. Each call may return the event it caused
    at once (FastAGI: commands block until the caller acts), or None when the event
    will come later through :meth:`CallDriver.push` (ARI: events arrive apart)."""

    #: True when events arrive on their own between commands (ARI); False when
    #: only commands return them (FastAGI), so an idle flow is a stall.
    pushes_events: bool

    async def answer(self) -> Event | None: ...
    async def play(self, playback_id: str, media: tuple[str, ...],
                   language: str) -> Event | None: ...
    async def stop_playback(self, playback_id: str) -> None: ...
    async def start_timer(self, timer_id: str, seconds: float) -> Event | None: ...
    async def cancel_timer(self, timer_id: str) -> None: ...
    async def arm_deadline(self, seconds: float) -> None: ...
    async def disarm_deadline(self) -> None: ...
    async def set_variables(self, pairs: tuple[tuple[str, str], ...]) -> Event | None: ...
    async def start_recording(self, path: str) -> None: ...
    async def continue_(self, destination: Destination | None) -> Event | None: ...
    async def hangup(self) -> None: ...
    def close(self) -> None: ...


class CallObserver(Protocol):
    """Told when a call enters and leaves the consent menu (metrics). What was decided
    is counted where it lands, by the consent writer."""

    def menu_entered(self) -> None: ...
    def menu_left(self) -> None: ...


def clean(value: object, limit: int = MAX_TEXT) -> str:
    """Untrusted channel text: no NUL, no lone surrogates (SQLite and HMAC reject
    them), at most ``limit`` characters."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = text.replace("\0", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def clean_id(value: object) -> str | None:
    """An Asterisk id from an event, or None if it cannot be one (then it is ignored)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    text = str(value)
    if not text or len(text) > MAX_ID or not text.isprintable() or not text.strip("."):
        return None
    if text != clean(text):
        return None
    return text


def call_info(channel_id: str, *, linkedid: object = None, name: object = "",
              caller: object = None) -> CallInfo:
    """A new call's identity from untrusted channel data; ``call_id`` is ours."""
    number = clean(caller)
    return CallInfo(
        call_id=uuid.uuid4().hex,
        channel_id=channel_id,
        linkedid=clean_id(linkedid) or channel_id,
        channel_name=clean(name),
        # Asterisk writes 'unknown' when there is no caller number.
        caller=None if number in ("", "unknown") else number,
    )


class CallDriver:
    """One call: a queue of events, one flow, one transport."""

    def __init__(self, flow: Flow | None, info: CallInfo, transport: Transport,
                 writer: ConsentWriter, recordings_dir: str, clock: Clock = time.time,
                 observer: CallObserver | None = None,
                 gate: RecordingGate | None = None) -> None:
        self.info = info
        self.transport = transport
        self.writer = writer
        self.clock = clock
        self.observer = observer
        self.flow = flow
        blocked = gate.reason if gate is not None else None
        self.machine = (CallFlow(flow, info, recordings_dir, recording_blocked=blocked)
                        if flow is not None else None)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.limit = (flow.max_menu_seconds if flow else 0) + SAFETY_MARGIN

    @property
    def channel_id(self) -> str:
        return self.info.channel_id

    def push(self, event: Event) -> None:
        """An event that arrived on its own (ARI), from the event loop."""
        self.queue.put_nowait(event)

    async def run(self) -> None:
        if self.machine is None:
            await self._unknown_flow()
            return
        if self.observer is not None:
            self.observer.menu_entered()
        try:
            await self._feed(CallStarted(self.clock()))
            while self.machine.phase is not Phase.DONE:
                await self._feed(await self._next_event())
        except Exception:  # one call's bug must never reach the service
            log.exception("call %s: internal error; the call is not recorded",
                          self.info.call_id)
            await self._bail_out()
        finally:
            self.transport.close()
            if self.observer is not None:
                self.observer.menu_left()

    async def _next_event(self) -> Event:
        assert self.machine is not None
        if not self.transport.pushes_events and self.queue.empty():
            # Nothing can arrive between commands: the flow waits for nothing that
            # will come. End it as a failure of ours (a bug), unrecorded.
            log.error("call %s: the flow stopped in %s", self.info.call_id,
                      self.machine.phase)
            return Failed(f"session stalled in {self.machine.phase}", self.clock())
        try:
            return await asyncio.wait_for(self.queue.get(), self.limit)
        except TimeoutError:
            return Failed("no event within the call's time limit", self.clock())

    async def _feed(self, event: Event) -> None:
        assert self.machine is not None
        pending: deque[Event] = deque([event])
        while pending:
            for command in self.machine.handle(pending.popleft()):
                result = await self._execute(command)
                if result is not None:
                    pending.append(result)
                    if isinstance(result, Failed | HungUp):
                        break  # the rest of this batch is moot; the flow re-plans

    async def _execute(self, command: Command) -> Event | None:
        t = self.transport
        try:
            match command:
                case Answer():
                    return await t.answer()
                case Play(playback_id=pid, media=media, language=language):
                    return await t.play(pid, media, language)
                case StopPlayback(playback_id=pid):
                    # Harmless if it fails (the prompt may have just ended): never
                    # let it cut short the batch that logs the decision.
                    try:
                        await t.stop_playback(pid)
                    except ConsentivrError as exc:
                        log.debug("call %s: stop playback: %s", self.info.call_id, exc)
                case StartTimer(timer_id=tid, seconds=seconds):
                    return await t.start_timer(tid, seconds)
                case CancelTimer(timer_id=tid):
                    await t.cancel_timer(tid)
                case ArmDeadline(seconds=seconds):
                    await t.arm_deadline(seconds)
                case DisarmDeadline():
                    await t.disarm_deadline()
                case LogDecision(record=record):
                    return await self.writer.log_decision(record)
                case StartRecording(path=path):
                    return await self._start_recording(path)
                case MarkRecording(call_id=call_id, confirmed=confirmed, error=error):
                    self.writer.mark_recording(call_id, confirmed, error)
                case SetVariables(variables=variables):
                    return await t.set_variables(variables)
                case Continue(destination=destination):
                    return await t.continue_(destination)
                case Hangup():
                    await t.hangup()
        except ChannelGone:
            return HungUp(self.clock())
        except ConsentivrError as exc:
            log.warning("call %s: %s", self.info.call_id, exc)
            return Failed(str(exc), self.clock())
        return None

    async def _start_recording(self, path: str) -> RecordingStarted:
        try:
            await self.transport.start_recording(path)
        except ConsentivrError as exc:
            log.warning("call %s: recording not confirmed: %s", self.info.call_id, exc)
            return RecordingStarted(False, self.clock(), str(exc))
        return RecordingStarted(True, self.clock())

    async def _bail_out(self) -> None:
        assert self.machine is not None
        if self.machine.phase is Phase.DONE:
            return
        with contextlib.suppress(ConsentivrError):
            await self.transport.hangup()

    async def _unknown_flow(self) -> None:
        try:
            for command in unknown_flow():
                if await self._execute(command) is not None:
                    break
        finally:
            self.transport.close()
