"""ARI mode: the Stasis app's transport and event routing.

:class:`AriTransport` carries one channel's commands to ARI (and recording to AMI);
:class:`StasisApp` routes this app's events to one :class:`~consentivr.driver.CallDriver`
per channel. Neither decides anything: the flow does, through the driver.

Events arrive on their own here (``pushes_events``): a prompt's end, a digit or a
timer is pushed to the driver when it happens. Prompts play with ARI playback ids
derived from the channel id (:func:`~consentivr.recovery.playback_id`), so that a
restarted consentivr can stop a prompt its predecessor started.

After an events (re)connect, :meth:`StasisApp.reconcile` takes back calls left in
Stasis (see :mod:`consentivr.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from consentivr.consentwriter import ConsentWriter
from consentivr.driver import CallDriver, CallObserver, call_info, clean, clean_id
from consentivr.errors import ConsentivrError
from consentivr.messages import (
    Clock,
    DeadlinePassed,
    DigitPressed,
    Event,
    HungUp,
    PlaybackFinished,
    TimerFired,
)
from consentivr.model import Destination
from consentivr.recovery import ChannelRecovery, Lookup, RecoveryAri, playback_id
from consentivr.settings import Settings
from consentivr.withdrawalpath import RecordingGate

log = logging.getLogger(__name__)

# The only ARI event types handle_event reads: the service asks Asterisk for these
# alone (an event filter), which halves the events per call.
EVENT_TYPES = ("StasisStart", "StasisEnd", "ChannelDtmfReceived", "PlaybackFinished",
               "ChannelHangupRequest", "ChannelDestroyed")
DEADLINE = "menu-deadline"


class RecorderLike(Protocol):
    async def start(self, channel: str, path: str, options: str) -> None: ...


class AriLike(RecoveryAri, Protocol):
    """What the Stasis app needs of the ARI client: what recovery needs, and more."""

    async def answer(self, channel_id: str) -> None: ...
    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None: ...
    async def application(self, app: str) -> dict[str, Any] | None: ...


class AriTransport:
    """One channel in our Stasis app."""

    pushes_events = True

    def __init__(self, app: StasisApp, channel_id: str, channel_name: str,
                 language: str = "") -> None:
        self.ari = app.ari
        self.recorder = app.recorder
        self.options = app.settings.recordings.options
        self.clock = app.clock
        self.channel_id = channel_id
        self.channel_name = channel_name
        self.language = language  # the channel's own, from StasisStart
        self.sink: Callable[[Event], None] = lambda event: None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._to_ari: dict[str, str] = {}
        self._from_ari: dict[str, str] = {}

    def playback_finished(self, ari_id: str, at: float) -> None:
        self.sink(PlaybackFinished(self._from_ari.get(ari_id, ari_id), at))

    def _later(self, key: str, seconds: float, make: Callable[[], Event]) -> None:
        self._timers[key] = asyncio.get_running_loop().call_later(
            seconds, lambda: self.sink(make()))

    def _cancel(self, key: str) -> None:
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    async def answer(self) -> None:
        await self.ari.answer(self.channel_id)

    async def play(self, playback_id_: str, media: tuple[str, ...], language: str) -> None:
        ari_id = playback_id(self.channel_id, len(self._to_ari) + 1)
        self._to_ari[playback_id_] = ari_id
        self._from_ari[ari_id] = playback_id_
        await self.ari.play(self.channel_id, ari_id, media, language)

    async def stop_playback(self, playback_id_: str) -> None:
        await self.ari.stop_playback(self._to_ari.get(playback_id_, playback_id_))

    async def start_timer(self, timer_id: str, seconds: float) -> None:
        self._later(timer_id, seconds, lambda: TimerFired(timer_id, self.clock()))

    async def cancel_timer(self, timer_id: str) -> None:
        self._cancel(timer_id)

    async def arm_deadline(self, seconds: float) -> None:
        self._later(DEADLINE, seconds, lambda: DeadlinePassed(self.clock()))

    async def disarm_deadline(self) -> None:
        self._cancel(DEADLINE)

    async def set_variables(self, pairs: tuple[tuple[str, str], ...]) -> None:
        # One request fewer when the channel already speaks the caller's language.
        await self.ari.set_variables(
            self.channel_id, [p for p in pairs if p != ("CHANNEL(language)", self.language)])

    async def start_recording(self, path: str) -> None:
        await self.recorder.start(self.channel_name, path, self.options)

    async def continue_(self, destination: Destination | None) -> None:
        d = destination or Destination("", "", 0)  # no location: right after Stasis()
        await self.ari.continue_in_dialplan(self.channel_id, d.context, d.exten, d.priority)

    async def hangup(self) -> None:
        await self.ari.hangup(self.channel_id)

    def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


class StasisApp:
    """Routes this Stasis app's events to one :class:`CallDriver` per channel."""

    def __init__(self, settings: Settings, ari: AriLike, recorder: RecorderLike,
                 writer: ConsentWriter, clock: Clock = time.time,
                 lookup: Lookup | None = None, observer: CallObserver | None = None,
                 gate: RecordingGate | None = None) -> None:
        self.settings = settings
        self.ari = ari
        self.recorder = recorder
        self.writer = writer
        self.clock = clock
        self.lookup = lookup
        self.observer = observer
        self.gate = gate
        self.sessions: dict[str, CallDriver] = {}
        self.transports: dict[str, AriTransport] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.recovering: set[str] = set()
        self.recovered: list[Any] = []  # recovery outcomes, newest last (bounded)

    def handle_event(self, event: dict[str, Any]) -> None:
        if not isinstance(event, dict):
            return
        self.writer.start()
        kind = event.get("type")
        if kind == "StasisStart":
            self._start(event)
            return
        channel_id = _channel_id(event)
        session = self.sessions.get(channel_id) if channel_id else None
        if session is None or channel_id is None:
            return
        at = self.clock()
        if kind == "ChannelDtmfReceived":
            digit = event.get("digit")
            if isinstance(digit, str) and len(digit) == 1:
                session.push(DigitPressed(digit, at))
        elif kind == "PlaybackFinished":
            playback = _mapping(event.get("playback"))
            self.transports[channel_id].playback_finished(clean(playback.get("id", "")), at)
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
        info = call_info(channel_id, linkedid=channel.get("linkedid"),
                         name=channel.get("name", ""),
                         caller=_mapping(channel.get("caller")).get("number"))
        transport = AriTransport(self, channel_id, info.channel_name,
                                 clean(channel.get("language", ""), 32))
        driver = CallDriver(flow, info, transport, self.writer,
                            str(self.settings.recordings.dir), self.clock, self.observer,
                            self.gate)
        transport.sink = driver.push
        if flow is not None:
            self.sessions[channel_id] = driver
            self.transports[channel_id] = transport
        self._spawn(self._run(driver))

    async def _run(self, driver: CallDriver) -> None:
        try:
            await driver.run()
        finally:
            if self.sessions.get(driver.channel_id) is driver:
                del self.sessions[driver.channel_id]
                del self.transports[driver.channel_id]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- recovery ----------------------------------------------------------

    def events_connected(self) -> None:
        """The events websocket is (re)connected: reconcile in the background, so that
        events flow meanwhile."""
        self.writer.start()
        self._spawn(self.reconcile())

    async def reconcile(self, settle: float = 0.3) -> None:
        """After an events (re)connect: take back calls left in our app, and end
        sessions whose channel vanished while we were not listening."""
        self.writer.start()
        # StasisStart events queued on the new websocket are handled first.
        await asyncio.sleep(settle)
        data: dict[str, Any] | None = None
        app = self.settings.ari.app if self.settings.ari else ""
        for attempt in range(3):
            try:
                data = await self.ari.application(app)
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

    async def _check_alive(self, session: CallDriver) -> None:
        try:
            alive = await self.ari.channel(session.channel_id) is not None
        except ConsentivrError:
            return
        if not alive:
            session.push(HungUp(self.clock()))

    async def _recover(self, channel_id: str) -> None:
        recovery = ChannelRecovery(
            flows=self.settings.flow_for, ari=self.ari,
            recorder=self.recorder, lookup=self.lookup, write=self.writer.durable,
            recordings_dir=str(self.settings.recordings.dir),
            recording_options=self.settings.recordings.options,
            mode=getattr(self.settings, "recovery", "continue"), clock=self.clock,
            recording_blocked=self.gate.reason if self.gate else None,
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
