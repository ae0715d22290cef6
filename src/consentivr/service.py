"""Wiring: builds the ARI client, the AMI pool, the consent log and the app from
``Settings``, and runs them until SIGTERM. The one place where parts meet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from consentivr.ami import AmiPool, Recorder
from consentivr.app import ConsentApp
from consentivr.ari import AriClient
from consentivr.config import Settings
from consentivr.errors import AmiError, ConsentivrError
from consentivr.store import (
    ConsentLog,
    GroupCommitter,
    database_is_world_readable,
    load_or_create_key,
)

log = logging.getLogger(__name__)


class _NoRecorder:
    """Used when no AMI is configured: every recording attempt is unconfirmed."""

    async def start(self, channel: str, path: str, options: str) -> None:
        raise AmiError("no AMI configured: recording cannot start")


def prepare_paths(settings: Settings) -> None:
    """Create the recordings dir 0700 and warn about a readable database."""
    rec = settings.recordings.dir
    rec.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(rec, 0o700)
    if database_is_world_readable(settings.database):
        log.warning("%s is readable by group or others: chmod 600 it", settings.database)


class Service:
    """The running ARI app with everything it needs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ari = AriClient(settings.ari)
        self.pool: AmiPool | None = None
        self.committer: GroupCommitter | None = None
        self.app: ConsentApp | None = None
        self._pump: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self, wait_connected: float | None = None) -> ConsentApp:
        settings = self.settings
        prepare_paths(settings)
        key = load_or_create_key(settings.database, settings.caller_key)
        path = settings.database
        self.committer = GroupCommitter(lambda: ConsentLog(path, key))
        recorder: Recorder | _NoRecorder = _NoRecorder()
        if settings.ami is not None:
            self.pool = AmiPool(settings.ami)
            await self.pool.connect(wait=wait_connected)
            recorder = Recorder(self.pool)
        self.app = ConsentApp(settings, self.ari, recorder, self.committer)
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(self.app))
        if wait_connected:
            await asyncio.wait_for(self.connected.wait(), wait_connected)
        log.info("consentivr serving Stasis app %r with flows: %s", settings.ari.app,
                 ", ".join(settings.flows))
        return self.app

    async def _on_connect(self) -> None:
        self.connected.set()

    async def _pump_events(self, app: ConsentApp) -> None:
        async for event in self.ari.events(self.settings.ari.app, on_connect=self._on_connect):
            try:
                app.handle_event(event)
            except (ConsentivrError, KeyError, TypeError, ValueError, AttributeError):
                log.exception("event %s could not be handled", event.get("type"))

    async def stop(self, drain: float = 5.0) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self.app is not None:
            await self.app.drain(timeout=drain)
        await self.ari.close()
        if self.pool is not None:
            self.pool.close()
        if self.committer is not None:
            self.committer.close()


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the Stasis app until ``stop`` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    service = Service(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping: waiting for calls in the menu")
        await service.stop()
