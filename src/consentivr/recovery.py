"""Taking back calls left in our Stasis app while we were away.

When consentivr is killed (or its events websocket drops) calls stay in Stasis:
Asterisk keeps them in the app, playing nothing, until someone says what to do.
On every (re)connect the app lists them (``GET /applications/{app}``) and
finishes each one here, within about two seconds:

- **a committed decision exists** (the consent log has a row for the channel's
  uniqueid): the call goes on with that decision. If it allowed recording and
  recording was confirmed, MixMonitor is still running in Asterisk; if we died
  between the commit and Asterisk's confirmation, recording starts now (unless
  Asterisk says it already runs). The log stays the only source of a yes.
- **no committed decision**: nothing the caller pressed counts. A row is logged
  with every purpose ``error`` and outcome ``error: ...``, so that no call goes
  on without a row, and the call goes on unrecorded.

Then the call continues to its flow's destination, or is hung up, as the
``recovery`` setting says. The flow comes from the channel's dialplan
application data (``Stasis(consentivr,<flow>)``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from consentivr.errors import ConsentivrError, StoreError
from consentivr.flow import (
    CallFlow,
    RecoveryRecording,
    recovery_recording,
    resumed_variables,
    unlogged_variables,
)
from consentivr.messages import (
    CallInfo,
    CallStarted,
    DecisionLogged,
    Failed,
    LogDecision,
    LoggedCall,
    SetVariables,
)
from consentivr.model import Destination, Flow

log = logging.getLogger(__name__)

BUDGET = 2.0  # seconds to finish one taken-back call
RECOVERED = "taken back after a restart before the menu ended"
_C = TypeVar("_C")


Lookup = Callable[[str], Awaitable["LoggedCall | None"]]
Write = Callable[[str, Any], Awaitable[bool]]


class RecoveryAri(Protocol):
    async def channel(self, channel_id: str) -> dict[str, Any] | None: ...
    async def stop_playback(self, playback_id: str) -> None: ...
    async def get_variable(self, channel_id: str, name: str) -> str | None: ...
    async def set_variable(self, channel_id: str, name: str, value: str) -> None: ...
    async def set_variables(self, channel_id: str,
                            pairs: Sequence[tuple[str, str]]) -> None: ...
    async def continue_in_dialplan(self, channel_id: str, context: str = "",
                                   extension: str = "", priority: int = 0) -> None: ...
    async def hangup(self, channel_id: str) -> None: ...


class RecoveryRecorder(Protocol):
    async def start(self, channel: str, path: str, options: str) -> None: ...


def playback_id(channel_id: str, n: int) -> str:
    """The ARI id of the ``n``-th prompt played to a channel (1-based).

    Derived from the channel so that recovery can stop a prompt a crashed process
    started: Asterisk runs ``continue`` only after the current playback ends.
    """
    return f"{channel_id}-p{n}"


def plays_bound(flow: Flow | None) -> int:
    """At most how many prompts a call of this flow plays (each retry is one more)."""
    if flow is None:
        return 16
    menu = flow.language_menu
    plays = 1 + sum(p.retries + 1 for p in flow.purposes)
    if menu is not None:
        plays += menu.retries + 1
    return plays + 2


def flow_name_from_app_data(app_data: str) -> str | None:
    """``consentivr,main`` -> ``main``; no second argument -> None (the default flow)."""
    parts = [p.strip().strip('"') for p in app_data.split(",")]
    return parts[1] if len(parts) > 1 and parts[1] else None


def lookup_for(settings: Any) -> Lookup:
    """:func:`lookup_in` on the configured backend: the SQLite file, or a shared
    PostgreSQL log (read through :func:`consentivr.consentlog.open_reader`)."""
    if settings.database_url is None:
        return lookup_in(settings.database)
    from consentivr.consentlog import open_reader

    def query(uniqueid: str) -> LoggedCall | None:
        conn = open_reader(settings)
        try:
            row = conn.execute(_NEWEST_ROW, (uniqueid,)).fetchone()
        finally:
            conn.close()
        return None if row is None else _logged_call(tuple(row))

    async def lookup(uniqueid: str) -> LoggedCall | None:
        return await asyncio.to_thread(query, uniqueid)

    return lookup


_NEWEST_ROW = ("SELECT call_id, flow, language, decisions, recording_path, "
               "recording_confirmed FROM calls WHERE uniqueid = ? ORDER BY seq DESC LIMIT 1")


def lookup_in(database: Path) -> Lookup:
    """A lookup of the newest committed row for a uniqueid, read-only, off the event loop."""

    def query(uniqueid: str) -> LoggedCall | None:
        if not database.exists():
            return None
        try:
            conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error as exc:
            raise StoreError(f"{database}: cannot read the consent log: {exc}") from exc
        try:
            row = conn.execute(_NEWEST_ROW, (uniqueid,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{database}: cannot read the consent log: {exc}") from exc
        finally:
            conn.close()
        return None if row is None else _logged_call(tuple(row))

    async def lookup(uniqueid: str) -> LoggedCall | None:
        return await asyncio.to_thread(query, uniqueid)

    return lookup


def _logged_call(row: tuple[Any, ...]) -> LoggedCall:
    call_id, flow, language, decisions, path, confirmed = row
    try:
        parsed = json.loads(decisions)
    except ValueError:
        parsed = {}
    return LoggedCall(
        call_id=str(call_id), flow=str(flow), language=str(language),
        decisions={str(k): str(v) for k, v in dict(parsed).items()},
        recording_path=path, recording_confirmed=None if confirmed is None else bool(confirmed),
    )


def _started_at(channel: Mapping[str, Any], fallback: float) -> float:
    """The channel's ``creationtime`` (``2026-01-02T10:11:12.345+0000``) as epoch seconds."""
    try:
        return datetime.strptime(str(channel.get("creationtime")),
                                 "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return fallback


@dataclass
class Outcome:
    """What recovery did with one channel (logged, and read by tests)."""

    channel_id: str
    action: str = "gone"  # gone | continued | hung_up | failed
    logged: bool = False  # a committed row backs the call's variables
    resumed: bool = False  # the row existed before recovery
    recording: bool = False


class ChannelRecovery:
    """Finishes one channel that sits in our app without a live session."""

    def __init__(self, *, flows: Callable[[str | None], Flow | None], ari: RecoveryAri,
                 recorder: RecoveryRecorder, lookup: Lookup | None, write: Write,
                 recordings_dir: str, recording_options: str, mode: str,
                 clock: Callable[[], float] = time.time,
                 recording_blocked: str | None = None) -> None:
        self.flows = flows
        self.ari = ari
        self.recorder = recorder
        self.lookup = lookup
        self.write = write
        self.recordings_dir = recordings_dir.rstrip("/")
        self.recording_options = recording_options
        self.mode = mode
        self.clock = clock
        self.recording_blocked = recording_blocked

    async def run(self, channel_id: str, *, caller: str | None = None,
                  sanitize: Callable[[object], str] = str) -> Outcome:
        outcome = Outcome(channel_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUDGET
        channel = await self.ari.channel(channel_id)
        if channel is None:
            return outcome
        dialplan = channel.get("dialplan") if isinstance(channel.get("dialplan"), dict) else {}
        flow = self.flows(flow_name_from_app_data(sanitize((dialplan or {}).get("app_data", ""))))
        variables: tuple[tuple[str, str], ...] = unlogged_variables(flow).variables
        destination = flow.destination if flow else None
        await self._stop_prompts(channel_id, flow)
        try:
            # Leave time for the final continue/hang-up within the budget.
            variables = await asyncio.wait_for(
                self._decide(channel_id, channel, flow, outcome, caller, sanitize),
                max(0.1, deadline - loop.time() - 0.3))
        except TimeoutError:
            log.warning("channel %r: recovery ran out of time; goes on unrecorded", channel_id)
            outcome.logged = outcome.recording = False
            variables = unlogged_variables(flow).variables
        if self.mode == "hangup":
            await self.ari.hangup(channel_id)
            outcome.action = "hung_up"
        else:
            await self.ari.set_variables(channel_id, variables)
            d = destination or Destination("", "", 0)
            await self.ari.continue_in_dialplan(channel_id, d.context, d.exten, d.priority)
            outcome.action = "continued"
        return outcome

    async def _stop_prompts(self, channel_id: str, flow: Flow | None) -> None:
        """Stop whatever prompt the last process left playing (a 404 is fine)."""
        results = await asyncio.gather(
            *(self.ari.stop_playback(playback_id(channel_id, n))
              for n in range(1, plays_bound(flow) + 1)),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("channel %r: could not stop its prompts: %s", channel_id, failed[0])

    async def _decide(self, channel_id: str, channel: Mapping[str, Any], flow: Flow | None,
                      outcome: Outcome, caller: str | None,
                      sanitize: Callable[[object], str]) -> tuple[tuple[str, str], ...]:
        logged: LoggedCall | None = None
        if self.lookup is not None:
            try:
                logged = await self.lookup(channel_id)
            except ConsentivrError as exc:
                log.error("channel %r: consent log lookup failed (%s); treating the call "
                          "as undecided", channel_id, exc)
        if logged is not None:
            outcome.logged = outcome.resumed = True
            return await self._resume(channel_id, sanitize(channel.get("name", "")), logged,
                                      outcome)
        if flow is None:
            return unlogged_variables(None).variables
        info = CallInfo(
            call_id=_new_call_id(), channel_id=channel_id, linkedid=channel_id,
            channel_name=sanitize(channel.get("name", "")), caller=caller,
        )
        machine = CallFlow(flow, info, self.recordings_dir)
        now = self.clock()
        machine.handle(CallStarted(_started_at(channel, now)))  # nothing is played
        record = _only(machine.handle(Failed(RECOVERED, now)), LogDecision).record
        ok = await self.write("append", record)
        outcome.logged = ok
        commands = machine.handle(DecisionLogged(ok, self.clock()))
        return _only(commands, SetVariables).variables

    async def _resume(self, channel_id: str, channel_name: str, logged: LoggedCall,
                      outcome: Outcome) -> tuple[tuple[str, str], ...]:
        plan = recovery_recording(logged, self.recordings_dir, hanging_up=self.mode == "hangup",
                                  blocked=self.recording_blocked is not None)
        recording = plan is RecoveryRecording.RUNNING
        if plan is RecoveryRecording.START:
            path = f"{self.recordings_dir}/{logged.call_id}.wav"
            recording = await self._start_recording(channel_id, channel_name, logged, path)
        outcome.recording = recording
        return resumed_variables(logged, recording).variables

    async def _start_recording(self, channel_id: str, channel_name: str,
                               logged: LoggedCall, path: str) -> bool:
        """The yes was committed but recording never confirmed: confirm or start it now."""
        try:
            running = await self.ari.get_variable(channel_id, "MIXMONITOR_FILENAME")
        except ConsentivrError:
            running = None
        error: str | None = None
        if running:
            ok = True
        else:
            try:
                await asyncio.wait_for(
                    self.recorder.start(channel_name, path, self.recording_options), 1.0)
                ok = True
            except (ConsentivrError, TimeoutError) as exc:
                ok, error = False, str(exc) or "no answer"
                log.warning("call %s: recording not confirmed on recovery: %s",
                            logged.call_id, error)
        await self.write("mark_recording", (logged.call_id, ok, error, self.clock()))
        return ok


def _only(commands: list[Any], kind: type[_C]) -> _C:
    found = [c for c in commands if isinstance(c, kind)]
    if len(found) != 1:
        raise ConsentivrError(f"recovery expected one {kind.__name__}, got {len(found)}")
    return found[0]


def _new_call_id() -> str:
    return uuid.uuid4().hex
