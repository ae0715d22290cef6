"""The AMI event listener for recordings: withdrawal by key, hold muting, actual times.

Its own AMI connection with events on (the action pool runs with events off),
filtered to the few events :class:`~consentivr.tracker.RecordingTracker` reads (by
Asterisk, with the ``Filter`` action; what still comes is read without panoramisk's
parser, see :class:`~consentivr.ami.EventManager`). Events are handled one at a time,
in order, by one task: the tracker decides, this module acts (AMI actions, consent log
updates, file deletion). Withdrawals are written on our own connection and are durable
before they are reported; recording times nobody waits for share the commits of the
service's decision rows (lazy writes of :class:`~consentivr.store.GroupCommitter`).
Nothing here can end a call or the service: every failure is logged and skipped.

On every (re)login it also picks up withdrawals the dialplan noted (a global
variable per channel, see :mod:`consentivr.features`) while consentivr was away, for
the recorded calls of the last day, so none is lost while Asterisk keeps running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from panoramisk import Manager

from consentivr.ami import EventManager
from consentivr.errors import AmiError, ConsentivrError
from consentivr.features import NOTE_PREFIX
from consentivr.settings import Settings
from consentivr.tasks import cancel_and_wait
from consentivr.tracker import (
    Command,
    Mute,
    RecordingBegan,
    RecordingEnded,
    RecordingTracker,
    Withdrawn,
)
from consentivr.withdrawal import (
    RecordingLog,
    RecordingNotDeleted,
    Withdrawal,
    WithdrawalError,
    apply_withdrawal,
    delete_recording,
    stop_mixmonitor,
)
from consentivr.withdrawalpath import (
    Finding,
    RecordingGate,
    UserEventProbe,
    check_withdrawal_path,
    problem,
)

log = logging.getLogger(__name__)

EVENTS = (
    "UserEvent", "MixMonitorStart", "MixMonitorStop", "BridgeEnter", "BridgeLeave",
    "LocalBridge", "Hold", "Unhold", "MusicOnHoldStart", "MusicOnHoldStop", "Hangup",
    "Rename",
)
# Asterisk matches a Filter regex (POSIX extended, glibc) against the whole text of
# every event: fewer events cross the wire. Asterisk writes "Privilege: " right after
# the "Event: " line, so the name is matched whole (HangupRequest, 2 per call, stays
# out) without a bracket class like [[:space:]]: under a UTF-8 locale glibc runs those
# about 7 times slower, and Asterisk pays that for every event of every call.
EVENT_FILTER = f"Event: ({'|'.join(EVENTS)})..Privilege: "
# After a delete, MixMonitor's own thread may still be closing the file.
RECHECK_DELETE = 2.0
# How far back to look for withdrawals made while we were away: longer than any call.
CATCH_UP_SECONDS = 86400.0
Clock = Callable[[], float]


class TimeCommitter(Protocol):
    """What the listener needs of :class:`consentivr.store.GroupCommitter`."""

    def submit(self, kind: str, payload: Any,
               lazy: bool = False) -> concurrent.futures.Future[None]: ...
    def flush(self) -> concurrent.futures.Future[None]: ...


class ListenerObserver(Protocol):
    """Told when the AMI connection goes up or down, and of each first withdrawal."""

    def component_up(self, name: str, up: bool, reason: str | None = None) -> None: ...
    def withdrawal(self, by: str) -> None: ...
    def set_problem(self, name: str, reason: str | None) -> None: ...


class RecordingListener:
    """Listens to AMI and keeps recordings to the conversation the caller agreed to."""

    def __init__(self, settings: Settings, clock: Clock = time.time,
                 observer: ListenerObserver | None = None,
                 gate: RecordingGate | None = None,
                 committer: TimeCommitter | None = None) -> None:
        self.settings = settings
        # The service's group committer: recording times share its commits. Without
        # one (a listener on its own), they go through our own connection.
        self.committer = committer
        self.time_write_failures = 0  # recording times that did not reach the log
        self.clock = clock
        self.observer = observer
        self.gate = gate  # closed while the withdrawal path is not verified
        self.findings: list[Finding] = []  # the last withdrawal-path check
        self.checked = asyncio.Event()  # set once the first check has run
        self._probe = UserEventProbe()
        self.tracker = RecordingTracker()
        self.logged_in = asyncio.Event()
        self.done: list[Command | Withdrawal] = []  # what was carried out, for tests
        self._changed = asyncio.Condition()
        self._queue: asyncio.Queue[tuple[str, dict[str, str], float]] = asyncio.Queue()
        self._manager: Manager | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._db = concurrent.futures.ThreadPoolExecutor(1, "recording-log")
        self._stopped = False
        self._log: RecordingLog | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Connect; wait up to ``wait`` seconds for the login (None: don't wait)."""
        ami = self.settings.ami
        if ami is None:
            log.warning("no ami: in the config: withdrawal by key is not logged and hold "
                        "is not muted")
            return
        loop = asyncio.get_running_loop()
        # Events skip panoramisk's parsing (ami.EventManager); a refused Filter only
        # costs us reading the first line of the events we do not want.
        self._manager = EventManager(
            self._on_event, EVENTS,
            loop=loop, host=ami.host, port=ami.port, username=ami.username,
            secret=ami.password, events="call,user", encoding="utf8", reconnect_timeout=1,
            ping_delay=10, on_login=self._on_login, on_disconnect=self._on_disconnect,
        )
        self._manager.connect()
        self._task = loop.create_task(self._run())
        if wait:
            try:
                await asyncio.wait_for(self.logged_in.wait(), wait)
            except TimeoutError as exc:
                raise AmiError(f"AMI at {ami.host}:{ami.port}: no login within {wait:g}s "
                               "(recording listener)") from exc

    async def stop(self) -> None:
        """Stop listening; safe to call twice (tests stop it early, then the service)."""
        if self._stopped:
            return
        self._stopped = True
        if self._manager is not None:
            self._manager.close()
            self._manager.connection_lost = lambda exc: None  # type: ignore[method-assign]
        for task in [self._task, *self._tasks]:
            await cancel_and_wait(task)
        await asyncio.get_running_loop().run_in_executor(self._db, self._close_log)
        self._db.shutdown(wait=True)

    def _on_login(self, _manager: Manager) -> None:
        log.info("AMI recording listener connected")
        self.logged_in.set()
        if self.observer is not None:
            self.observer.component_up("ami", True)
        self._spawn(self._after_login())

    def _on_disconnect(self, _manager: Manager, _exc: object) -> None:
        if self.logged_in.is_set():
            log.warning("AMI recording listener lost its connection; reconnecting")
        self.logged_in.clear()
        if self.observer is not None:
            self.observer.component_up("ami", False, "AMI connection lost; reconnecting")
        self._set_gate("withdrawal key cannot be honoured (AMI connection lost)")

    async def _after_login(self) -> None:
        try:
            await self.action({"Action": "Filter", "Operation": "Add", "Filter": EVENT_FILTER})
        except AmiError as exc:  # needs write=system; without it we just get every event
            log.debug("AMI Filter not set: %s", exc)
        self._queue.put_nowait(("catch_up", {}, self.clock()))
        await self.check_withdrawal_path()

    async def check_withdrawal_path(self) -> list[Finding]:
        """Run the withdrawal-path checks on this connection and set the gate."""
        self.findings = await check_withdrawal_path(self.action, self.probe,
                                                    self.settings.withdrawal)
        self._set_gate(problem(self.findings))
        self.checked.set()
        return self.findings

    def _set_gate(self, reason: str | None) -> None:
        if self.observer is not None:
            self.observer.set_problem("withdrawal", reason)
        if self.gate is None or not self.gate.set(reason):
            return
        if reason is None:
            log.info("withdrawal path verified: recordings may start")
        else:
            log.error("%s: recordings are not started until it works", reason)

    @property
    def events_dropped(self) -> int:
        """Events that reached us but that we do not read (Asterisk's Filter should
        have kept them out)."""
        return self._manager.events_dropped if self._manager is not None else 0

    async def probe(self, token: str, timeout: float = 3.0) -> bool:
        """Send a UserEvent and wait until it comes back on our event stream."""
        return await self._probe.probe(self.action, token, timeout)

    def _on_event(self, event: dict[str, str]) -> None:
        if self._probe.heard(event):
            return
        self._queue.put_nowait(("event", event, self.clock()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- AMI ----------------------------------------------------------------

    async def action(self, fields: Mapping[str, str]) -> Any:
        """One action on our connection; AmiError unless it succeeds."""
        if self._manager is None or not self.logged_in.is_set():
            raise AmiError("AMI is not connected")
        assert self.settings.ami is not None
        try:
            response = await asyncio.wait_for(
                self._manager.send_action(dict(fields)), self.settings.ami.timeout)
        except TimeoutError as exc:
            raise AmiError(f"AMI {fields.get('Action')}: no answer") from exc
        except (OSError, AttributeError) as exc:
            raise AmiError(f"AMI {fields.get('Action')}: connection failed") from exc
        first = response[0] if isinstance(response, list) and response else response
        if first is None or not getattr(first, "success", False):
            message = getattr(first, "message", None) or "no response"
            raise AmiError(f"AMI {fields.get('Action')}: {message}")
        return response

    # -- the one worker -----------------------------------------------------

    async def _run(self) -> None:
        while True:
            kind, event, at = await self._queue.get()
            try:
                if kind == "catch_up":
                    await self._catch_up()
                else:
                    for command in self.tracker.handle(event, at):
                        await self._execute(command)
            except Exception:  # a bug here must never stop recordings being guarded
                log.exception("recording listener: %s %s failed", kind, event.get("Event"))

    async def _execute(self, command: Command) -> None:
        match command:
            case Mute(channel=channel, muted=muted, why=why, seconds=seconds):
                try:
                    await self.action({"Action": "MixMonitorMute", "Channel": channel,
                                       "Direction": "both", "State": "1" if muted else "0"})
                except AmiError as exc:
                    log.info("recording of %s: mute=%s not applied: %s", channel, muted, exc)
                    return
                if muted:
                    log.info("recording of %s muted: %s", channel, why)
                else:
                    log.info("recording of %s unmuted after %.1f s of hold", channel, seconds)
            case RecordingBegan(uniqueid=uid, at=at):
                await self._write_time("recording_started", uid, at)
            case RecordingEnded(uniqueid=uid, at=at):
                await self._write_time("recording_stopped", uid, at)
            case Withdrawn():
                await self._withdrawn(command)
        await self._note(command)

    async def _write_time(self, kind: str, uniqueid: str, at: float) -> None:
        """A recording time: nobody waits for it, but it is never lost silently.

        With the service's committer it joins the next batch of decision rows (one
        fsync for all); a failure is logged and counted when the committer reports it.
        """
        if self.committer is None:
            try:
                await self._db_call(lambda lg: getattr(lg, kind)(uniqueid, at))
            except ConsentivrError as exc:
                self._time_failed(kind, uniqueid, exc)
            return
        loop = asyncio.get_running_loop()

        def written(fut: concurrent.futures.Future[None]) -> None:  # on the writer thread
            error = None if fut.cancelled() else fut.exception()
            if error is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._time_failed, kind, uniqueid, error)

        self.committer.submit(kind, (uniqueid, at), lazy=True).add_done_callback(written)

    def _time_failed(self, kind: str, uniqueid: str, error: BaseException) -> None:
        self.time_write_failures += 1
        log.error("recording of %s: %s NOT written to the consent log: %s", uniqueid,
                  kind.replace("_", " "), error)

    async def _flush_times(self) -> None:
        """Recording times still waiting for a batch go first: a withdrawal right
        after the recording began must find its start time in the row."""
        if self.committer is None:
            return
        with contextlib.suppress(Exception):  # a failed time is reported on its own
            await asyncio.wrap_future(self.committer.flush())

    async def _withdrawn(self, w: Withdrawn) -> None:
        if w.channel:
            # The withdraw context has stopped it already; this covers an edited context.
            with contextlib.suppress(AmiError):
                await stop_mixmonitor(self, w.channel)
        await self._apply(w.call_id or w.uniqueid, w.by, w.at)
        if w.uniqueid:
            await self._clear_note(w.uniqueid)

    async def _apply(self, key: str, by: str, at: float) -> None:
        by = by if by in ("caller", "agent") else "caller"
        settings = self.settings
        await self._flush_times()
        try:
            result = await self._db_call(lambda lg: apply_withdrawal(
                lg, settings.recordings.dir, key, by, at, settings.withdrawal.on_withdraw,
                settings.recordings.previous_dirs))
        except RecordingNotDeleted as exc:
            log.error("%s", exc)
            return
        except WithdrawalError as exc:
            log.warning("withdrawal not logged: %s", exc)
            return
        except ConsentivrError as exc:
            log.error("withdrawal of %s NOT logged: %s", key, exc)
            raise
        log.info("%s", result.describe())
        if result.first and self.observer is not None:
            self.observer.withdrawal(result.by)
        if result.file == "deleted":
            self._spawn(self._delete_again(result.call_id))
        await self._note(result)

    async def _delete_again(self, call_id: str) -> None:
        """MixMonitor writes from its own thread: make sure no file comes back."""
        await asyncio.sleep(RECHECK_DELETE)
        row = await self._db_call(lambda lg: lg.find(call_id))
        path = (row or {}).get("recording_path")
        if path and Path(path).exists():
            outcome, detail = await asyncio.to_thread(
                delete_recording, self.settings.recordings.dir, path,
                self.settings.recordings.previous_dirs)
            log.info("call %s: recording file reappeared after the withdrawal: %s %s",
                     call_id, outcome, detail)

    async def _catch_up(self) -> None:
        """Withdrawals the dialplan noted while we were away (recent recorded calls only)."""
        since = self.clock() - CATCH_UP_SECONDS
        candidates = await self._db_call(lambda lg: lg.recorded_since(since))
        for uniqueid in candidates:
            try:
                response = await self.action({"Action": "Getvar",
                                              "Variable": NOTE_PREFIX + uniqueid})
            except AmiError as exc:
                log.debug("withdrawal note of %s not read: %s", uniqueid, exc)
                continue
            note = str(response.get("Value") or "").strip()
            if not note:
                continue
            at_text, by, call_id = [*note.split(" ", 2), "", ""][:3]
            try:
                at = float(at_text)
            except ValueError:
                at = self.clock()
            log.info("withdrawal made while consentivr was away: %s", uniqueid)
            await self._apply(call_id.strip() or uniqueid, by.strip() or "caller", at)
            await self._clear_note(uniqueid)

    async def _clear_note(self, uniqueid: str) -> None:
        with contextlib.suppress(AmiError):
            await self.action({"Action": "Setvar", "Variable": NOTE_PREFIX + uniqueid,
                               "Value": ""})

    # -- the consent log, on one thread ---------------------------------------

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _with_log(self, fn: Callable[[RecordingLog], Any]) -> Any:
        if self._log is None:
            self._log = RecordingLog.for_settings(self.settings)
        return fn(self._log)

    async def _db_call(self, fn: Callable[[RecordingLog], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, self._with_log, fn)

    # -- observing (tests, diagnostics) ---------------------------------------

    async def _note(self, item: Command | Withdrawal) -> None:
        async with self._changed:
            self.done.append(item)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Command | Withdrawal], bool],
                       timeout: float) -> Command | Withdrawal:
        """The first carried-out command or withdrawal matching ``predicate``."""
        async def found() -> Command | Withdrawal:
            async with self._changed:
                while True:
                    for item in self.done:
                        if predicate(item):
                            return item
                    await self._changed.wait()

        return await asyncio.wait_for(found(), timeout)
