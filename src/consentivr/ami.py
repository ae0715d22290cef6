"""The AMI adapter: starts, stops and mutes MixMonitor. It decides nothing.

Why AMI and not dialplan variables: the AMI ``MixMonitor`` action answers
Success or Error, so the consent log can say whether recording was *confirmed*
started; the same connection later serves ``StopMixMonitor`` (withdrawal) and
``MixMonitorMute`` (hold). Asterisk runs one connection's actions one at a
time, so a small pool of connections keeps the round trip short under load.

Faults: every connection reconnects by itself with capped exponential backoff
(Asterisk restarts, network hiccups, a refused login). An action in flight when its
connection drops fails at once (``AmiError``) and is never re-sent later:
panoramisk would otherwise replay it after the reconnect, long after the call
was told recording is not confirmed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Collection, Mapping
from typing import Any

from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message

from consentivr.errors import AmiError
from consentivr.settings import AmiSettings

log = logging.getLogger(__name__)

_NOT_LOST: Any = object()


class _DropWhenClosing:
    """A transport whose ``write`` after close is dropped, as asyncio's own transports
    do (uvloop's raise, and panoramisk logs a traceback for each)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class AmiProtocol(AMIProtocol):  # type: ignore[misc]  # panoramisk is untyped
    """panoramisk's protocol, safe on uvloop too (the ``fast`` extra).

    On uvloop a connection can be reported lost before panoramisk's Manager has
    attached itself to the protocol (``factory``): panoramisk then fails with a
    traceback and never schedules its reconnect. Here such a loss is handed to the
    Manager as soon as it attaches, the order asyncio's own loop gives.
    Pass it as ``Manager(protocol_factory=AmiProtocol)``.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lost_early: Any = _NOT_LOST
        super().connection_made(_DropWhenClosing(transport))  # type: ignore[arg-type]

    @property
    def factory(self) -> Any:
        return self.__dict__.get("_factory")

    @factory.setter
    def factory(self, manager: Any) -> None:
        self.__dict__["_factory"] = manager
        lost = self.__dict__.get("_lost_early", _NOT_LOST)
        if manager is not None and lost is not _NOT_LOST:
            self._lost_early = _NOT_LOST
            # After the Manager's own connection_made has finished attaching.
            asyncio.get_running_loop().call_soon(super().connection_lost, lost)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.factory is None and not self.closed:
            self._lost_early = exc
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """With an :class:`EventManager`, events go to it as plain dicts, and only the
        ones it wants: panoramisk's ``Message`` (a case-insensitive dict, built line by
        line) and its pattern dispatch cost more than everything else the recording
        listener does with an event. Responses, and events that answer an action
        (they carry its ActionID), still go through panoramisk."""
        manager = self.factory
        if not isinstance(manager, EventManager):
            super().data_received(data)
            return
        text = data.decode(getattr(self, "encoding", "ascii"), "ignore")
        if self.version is None and text.startswith("Asterisk Call Manager/"):
            self.version = text.partition(EOL)[0].partition("/")[2].strip()
        if self.queue:
            text = self.queue.popleft() + text
        blocks = text.split(EOL + EOL)
        self.queue.append(blocks.pop())
        wanted = manager.events_wanted
        for block in blocks:
            block = block.strip()
            if block.startswith("Event: ") and "\nActionID: " not in block:
                name = block[7:block.find(EOL)] if EOL in block else block[7:]
                if name != "Shutdown":  # panoramisk reconnects on that one
                    if wanted is None or name in wanted:
                        manager.on_event(parse_event(block))
                    else:
                        manager.events_dropped += 1
                    continue
            message = Message.from_line(block)
            if message is not None:
                self.handle_message(message)


EOL = "\r\n"


def parse_event(block: str) -> dict[str, str]:
    """An AMI event's ``Key: value`` lines as a dict (a repeated key keeps its first value)."""
    fields: dict[str, str] = {}
    for line in block.split(EOL):
        key, sep, value = line.partition(": ")
        if sep and key not in fields:
            fields[key] = value
    return fields


class EventManager(Manager):  # type: ignore[misc]  # panoramisk is untyped
    """A panoramisk Manager that hands unsolicited events to ``on_event`` as plain
    dicts, only those named in ``events_wanted`` (None: all); actions work as usual.

    The others are dropped after reading their first line, before any parsing.
    """

    def __init__(self, on_event: Callable[[dict[str, str]], None],
                 events_wanted: Collection[str] | None = None, **config: Any) -> None:
        super().__init__(protocol_factory=AmiProtocol, **config)
        self.on_event = on_event
        self.events_wanted = None if events_wanted is None else frozenset(events_wanted)
        self.events_dropped = 0  # received but not wanted: Asterisk's filter let them by

    def dispatch(self, event: Any) -> list[str]:
        """An event panoramisk parsed (one carrying an ActionID, e.g. from the
        UserEvent action): the same plain dict."""
        name = event.get("Event")
        if self.events_wanted is None or name in self.events_wanted:
            # Message keeps (key, value) pairs in _store, in the case they came in.
            store = getattr(event, "_store", None)
            pairs = store.values() if isinstance(store, dict) else event.items()
            self.on_event({str(k): str(v) for k, v in pairs if k != "content"})
        return []


# Never replayed by panoramisk after a reconnect (see the module docstring).
_OURS = ("ping", "login", "logoff", "mixmonitor", "stopmixmonitor", "mixmonitormute")
MAX_BACKOFF = 10.0


class _Connection(Manager):  # type: ignore[misc]  # panoramisk is untyped
    """One panoramisk connection with backoff, a login-refused log line and a clean close."""

    def __init__(self, name: str, **config: Any) -> None:
        super().__init__(forgetable_actions=_OURS, protocol_factory=AmiProtocol, **config)
        self.name = name
        self.closed = False
        self.delay = 0.5
        self.was_up = False
        self.inflight: set[asyncio.Future[Any]] = set()

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        if self.closed:
            return None
        return super().connect(*args, **kwargs)

    def connection_made(self, f: Any) -> None:
        # panoramisk retries after ``reconnect_timeout``; grow it on each failure.
        if f.cancelled():  # the loop is shutting down
            return
        self.reconnect_timeout = self.delay * (0.8 + 0.4 * random.random())
        if f.exception() is not None and not self.closed:
            log.warning("AMI %s unreachable (%s); retrying in %.1fs", self.name,
                        type(f.exception()).__name__, self.reconnect_timeout)
        self.delay = min(self.delay * 2, MAX_BACKOFF)
        super().connection_made(f)

    def login(self, future: asyncio.Future[Any]) -> bool:
        if future.cancelled() or future.exception() is not None:
            self.authenticated_future = None
            return False
        ok = bool(super().login(future))
        if not ok:
            response = future.result()
            log.error("AMI %s refused the login of user %r: %s (check manager.conf)",
                      self.name, self.config.get("username"),
                      getattr(response, "message", None) or "no reason given")
        return ok

    def connection_lost(self, exc: Any) -> None:
        self.fail_inflight("connection lost")
        if self.closed:
            return
        super().connection_lost(exc)

    def fail_inflight(self, why: str) -> None:
        for fut in list(self.inflight):
            if not fut.done():
                fut.set_exception(AmiError(f"AMI {self.name}: {why}"))
        self.inflight.clear()

    def close(self) -> None:
        self.closed = True
        self.fail_inflight("closed")
        super().close()


class AmiPool:
    """A few authenticated AMI connections, used round-robin; they reconnect by themselves."""

    def __init__(self, settings: AmiSettings) -> None:
        self.settings = settings
        self._managers: list[_Connection] = []
        self._logged_in: list[asyncio.Event] = []
        self._next = itertools.count()
        self.logins = 0  # how many logins so far (tests watch reconnects with it)

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def connected(self) -> int:
        return sum(e.is_set() for e in self._logged_in)

    async def connect(self, wait: float | None = None) -> None:
        """Open the connections; wait up to ``wait`` seconds for one login (None: don't wait)."""
        loop = asyncio.get_running_loop()
        for _ in range(self.settings.connections):
            ready = asyncio.Event()

            def on_login(m: _Connection, ready: asyncio.Event = ready) -> None:
                self.logins += 1
                if m.was_up:
                    log.info("AMI reconnected to %s", self.where)
                else:
                    log.info("AMI connected to %s", self.where)
                m.was_up = True
                m.delay = 0.5
                ready.set()

            def on_disconnect(m: _Connection, _exc: object,
                              ready: asyncio.Event = ready) -> None:
                if ready.is_set() and not m.closed:
                    log.warning("AMI connection to %s lost; reconnecting", self.where)
                ready.clear()

            manager = _Connection(
                self.where, loop=loop, host=self.settings.host, port=self.settings.port,
                username=self.settings.username, secret=self.settings.password,
                events="off", encoding="utf8", reconnect_timeout=1, ping_delay=10,
                on_login=on_login, on_disconnect=on_disconnect,
            )
            manager.connect()
            self._managers.append(manager)
            self._logged_in.append(ready)
        if wait:
            try:
                await asyncio.wait_for(self._any_ready(), wait)
            except TimeoutError as exc:
                raise AmiError(f"AMI at {self.where}: no login within {wait:g}s") from exc

    async def _any_ready(self) -> None:
        while not any(e.is_set() for e in self._logged_in):
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for manager in self._managers:
            manager.close()

    def drop(self) -> None:
        """Close the current TCP connections; they reconnect (for tests and diagnostics)."""
        for manager in self._managers:
            if manager.protocol is not None:
                manager.protocol.transport.close()

    async def action(self, fields: Mapping[str, str]) -> Any:
        """Send one action on a logged-in connection; AmiError unless it succeeds."""
        name = fields.get("Action", "?")
        for key, value in fields.items():
            # A CR or LF would end the header and let channel data inject AMI fields.
            if any(c in str(key) + str(value) for c in "\r\n\0"):
                raise AmiError(f"AMI {name}: refusing a value with a line break in {key}")
        ready = [i for i, e in enumerate(self._logged_in) if e.is_set()]
        if not ready:
            raise AmiError(f"AMI {name}: not connected to {self.where}")
        manager = self._managers[ready[next(self._next) % len(ready)]]
        try:
            future = manager.send_action(dict(fields))
        except (OSError, AttributeError) as exc:  # AttributeError: no transport yet
            raise AmiError(f"AMI {name}: connection failed") from exc
        manager.inflight.add(future)
        try:
            response = await asyncio.wait_for(asyncio.shield(future), self.settings.timeout)
        except TimeoutError as exc:
            raise AmiError(f"AMI {name}: no answer in {self.settings.timeout:g}s") from exc
        finally:
            manager.inflight.discard(future)
        if isinstance(response, list):
            response = response[0] if response else None
        if response is None or not getattr(response, "success", False):
            message = getattr(response, "message", None) or "no response"
            raise AmiError(f"AMI {name}: {message}")
        return response


class Recorder:
    """MixMonitor control for one channel at a time, by channel name."""

    def __init__(self, pool: AmiPool) -> None:
        self.pool = pool

    async def start(self, channel: str, path: str, options: str) -> None:
        fields = {"Action": "MixMonitor", "Channel": channel, "File": path}
        if options:
            fields["Options"] = options
        await self.pool.action(fields)

    async def stop(self, channel: str) -> None:
        await self.pool.action({"Action": "StopMixMonitor", "Channel": channel})

    async def mute(self, channel: str, muted: bool, direction: str = "both") -> None:
        await self.pool.action({
            "Action": "MixMonitorMute", "Channel": channel,
            "Direction": direction, "State": "1" if muted else "0",
        })
