"""FastAGI mode: the server. One :class:`~consentivr.driver.CallDriver` per connection.

Calls reach us with ``AGI(agi://127.0.0.1:4573/<flow>,${CHANNEL(linkedid)})``. A
malformed session (garbage, a half-sent environment, an environment that never
ends, or an empty connection such as a health check) is closed without a flow and
without a log row; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from consentivr.agi.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ENV_TIMEOUT,
    LINE_LIMIT,
    AgiConnection,
    AgiConnectionLost,
    AgiError,
    flow_name,
)
from consentivr.agi.transport import AgiTransport
from consentivr.consentwriter import ConsentWriter
from consentivr.driver import CallDriver, CallObserver, call_info, clean_id
from consentivr.messages import Clock
from consentivr.settings import Settings
from consentivr.withdrawalpath import RecordingGate

log = logging.getLogger(__name__)


class AgiServer:
    """A FastAGI server routing each connection by flow name."""

    def __init__(self, settings: Settings, writer: ConsentWriter, clock: Clock = time.time,
                 env_timeout: float = ENV_TIMEOUT,
                 observer: CallObserver | None = None,
                 gate: RecordingGate | None = None) -> None:
        self.settings = settings
        self.writer = writer
        self.clock = clock
        self.env_timeout = env_timeout
        self.observer = observer
        self.gate = gate
        self.sessions: dict[str, CallDriver] = {}  # by agi_uniqueid
        self.tasks: set[asyncio.Task[None]] = set()
        self.rejected = 0  # connections closed without a session (empty, malformed)
        self._server: asyncio.Server | None = None

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen (port 0: any free port) and return the bound address."""
        self.writer.start()
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
        if uniqueid in self.sessions:
            log.error("channel %s: already in a session; refusing a second one", uniqueid)
            return
        flow = self.settings.flow_for(name)
        if flow is None:
            log.error("channel %s: unknown flow %r; not recorded, back to the dialplan",
                      env["agi_channel"], name)
        info = call_info(uniqueid, name=env["agi_channel"], caller=env.get("agi_callerid"),
                         linkedid=_linkedid_arg(env) or (
                             await self._linkedid(conn, uniqueid) if flow else uniqueid))
        transport = AgiTransport(
            conn, language=env.get("agi_language", ""),
            max_menu_seconds=flow.max_menu_seconds if flow else 0,
            recording_options=self.settings.recordings.options, clock=self.clock,
            call_id=info.call_id)
        driver = CallDriver(flow, info, transport, self.writer,
                            str(self.settings.recordings.dir), self.clock, self.observer,
                            self.gate)
        if flow is None:
            await driver.run()
            return
        self.sessions[uniqueid] = driver
        try:
            await driver.run()
        finally:
            self.sessions.pop(uniqueid, None)

    @staticmethod
    async def _linkedid(conn: AgiConnection, uniqueid: str) -> str:
        """No linkedid among the AGI arguments (a hand-written ``AGI()``): ask for it
        (one round trip)."""
        try:
            reply = await conn.command("GET VARIABLE", "CHANNEL(linkedid)")
        except AgiError:
            return uniqueid  # the driver finds out about the connection itself
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
