"""Wiring: builds the ARI client, the AMI pool, the consent log and the app from
``Settings``, and runs them until SIGTERM. The one place where parts meet.

It keeps running through faults: ARI and AMI reconnect by themselves, every
events (re)connect takes back calls left in Stasis (``ConsentApp.reconcile``),
and a consent log that cannot be opened or written leaves calls unrecorded
instead of stopping the service. Passwords and the caller key are redacted from
every log line (:mod:`consentivr.redaction`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from consentivr import redaction
from consentivr.ami import AmiPool, Recorder
from consentivr.app import EVENT_TYPES, ConsentApp
from consentivr.ari import AriClient
from consentivr.config import Settings
from consentivr.errors import AmiError, AriError, StoreError
from consentivr.listener import RecordingListener
from consentivr.recovery import lookup_in
from consentivr.store import (
    CallerKey,
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


class LazyLog:
    """The consent log, opened on first use and reopened after a failure to open.

    The service must start (and calls go on, unrecorded) even while the database is
    locked, on a full disk or unwritable: every write then fails with StoreError,
    which the app turns into "not logged, not recorded", until the log works again.
    Used only from the committer's writer thread.
    """

    def __init__(self, path: Path, key: CallerKey) -> None:
        self.path = path
        self.key = key
        self._log: ConsentLog | None = None
        self._lock = threading.Lock()

    def open(self) -> ConsentLog:
        with self._lock:
            if self._log is None:
                self._log = ConsentLog(self.path, self.key)
            return self._log

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never open the log for copy/pickle probes
            raise AttributeError(name)
        return getattr(self.open(), name)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def secrets_of(settings: Settings, key: CallerKey | None = None) -> list[str | bytes | None]:
    """Everything that must never appear in a log line."""
    ari = settings.ari
    found: list[str | bytes | None] = [
        ari.password, redaction.basic_auth_token(ari.username, ari.password),
        settings.caller_key,
    ]
    if settings.ami is not None:
        found.append(settings.ami.password)
    if key is not None:
        found.append(key.key)
    return found


class Service:
    """The running ARI app with everything it needs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        redaction.install(secrets_of(settings))
        self.ari = AriClient(settings.ari)
        self.pool: AmiPool | None = None
        self.recording_listener: RecordingListener | None = None
        self.committer: GroupCommitter | None = None
        self.app: ConsentApp | None = None
        self._pump: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self, wait_connected: float | None = None) -> ConsentApp:
        settings = self.settings
        prepare_paths(settings)
        key = load_or_create_key(settings.database, settings.caller_key)
        redaction.install([key.key])
        lazy = LazyLog(settings.database, key)
        try:
            lazy.open()
        except StoreError as exc:
            log.error("%s; calls go on unrecorded until it works", exc)
        self.committer = GroupCommitter(lambda: lazy)
        recorder: Recorder | _NoRecorder = _NoRecorder()
        if settings.ami is not None:
            self.pool = AmiPool(settings.ami)
            await self.pool.connect(wait=wait_connected)
            recorder = Recorder(self.pool)
            # Withdrawal by key and hold muting happen outside our Stasis app.
            self.recording_listener = RecordingListener(settings)
            await self.recording_listener.start(wait=wait_connected)
        self.app = ConsentApp(settings, self.ari, recorder, self.committer,
                              lookup=lookup_in(settings.database))
        self.app.start_background()
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(self.app))
        if wait_connected:
            await asyncio.wait_for(self.connected.wait(), wait_connected)
        log.info("consentivr serving Stasis app %r with flows: %s", settings.ari.app,
                 ", ".join(settings.flows))
        return self.app

    async def _on_connect(self) -> None:
        # Only the events the app reads: the rest (about half) cost both sides JSON.
        try:
            await self.ari.set_event_filter(self.settings.ari.app, EVENT_TYPES)
        except AriError as exc:  # an older Asterisk: we just get every event
            log.info("ARI event filter not set (%s); receiving every event", exc)
        self.connected.set()
        if self.app is not None:
            self.app.events_connected()

    async def _pump_events(self, app: ConsentApp) -> None:
        async for event in self.ari.events(self.settings.ari.app, on_connect=self._on_connect):
            try:
                app.handle_event(event)
            except Exception:  # one bad event must never stop the service
                log.exception("event %r could not be handled", event.get("type"))

    async def stop(self, drain: float = 5.0) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self.app is not None:
            await self.app.drain(timeout=drain)
            await self.app.close(timeout=drain)
        await self.ari.close()
        if self.recording_listener is not None:
            await self.recording_listener.stop()
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
