"""Wiring, the one place where parts meet, for both modes.

:class:`Service` builds from ``Settings`` the consent log (committer and
:class:`~consentivr.consentwriter.ConsentWriter`), the AMI recording listener
(withdrawal by key, hold muting, real recording times), the log redaction and, per
mode, the front end: the ARI client and :class:`~consentivr.stasis.StasisApp` with
recovery (``serve``), or the :class:`~consentivr.agi.AgiServer` (``agi``). Both
modes run every call through the same :class:`~consentivr.driver.CallDriver`.

It keeps running through faults: ARI and AMI reconnect by themselves, every
events (re)connect takes back calls left in Stasis, and a consent log that cannot
be opened or written leaves calls unrecorded instead of stopping the service.
Passwords and the caller key are redacted from every log line
(:mod:`consentivr.redaction`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consentivr import redaction
from consentivr.agi.protocol import DEFAULT_HOST, DEFAULT_PORT
from consentivr.agi.server import AgiServer
from consentivr.ami import AmiPool, Recorder
from consentivr.ari import AriClient
from consentivr.consentlog import caller_key_for, open_consent_log
from consentivr.consentwriter import ConsentWriter
from consentivr.errors import AmiError, AriError, StoreError
from consentivr.listener import RecordingListener
from consentivr.operations import Operations
from consentivr.ownership import prepare_recordings_dir
from consentivr.recovery import lookup_for
from consentivr.settings import Settings
from consentivr.stasis import EVENT_TYPES, StasisApp
from consentivr.store import (
    CallerKey,
    ConsentLog,
    GroupCommitter,
    database_is_world_readable,
)
from consentivr.tasks import cancel_and_wait
from consentivr.withdrawalpath import RecordingGate

log = logging.getLogger(__name__)


class _NoRecorder:
    """Used when no AMI is configured: every recording attempt is unconfirmed."""

    async def start(self, channel: str, path: str, options: str) -> None:
        raise AmiError("no AMI configured: recording cannot start")


def prepare_paths(settings: Settings) -> None:
    """Create the recordings dir (2770: the user model, see ownership.py) and warn
    about a readable database."""
    prepare_recordings_dir(settings.recordings.dir)
    if database_is_world_readable(settings.database):
        log.warning("%s is readable by group or others: chmod 600 it", settings.database)


class LazyLog:
    """The consent log, opened on first use and reopened after a failure to open.

    The service must start (and calls go on, unrecorded) even while the database is
    locked, on a full disk or unwritable: every write then fails with StoreError,
    which the app turns into "not logged, not recorded", until the log works again.
    Used only from the committer's writer thread.
    """

    def __init__(self, path: Path, key: CallerKey,
                 opener: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.key = key
        self._opener = opener or (lambda: ConsentLog(path, key))
        self._log: ConsentLog | None = None
        self._lock = threading.Lock()

    def open(self) -> ConsentLog:
        with self._lock:
            if self._log is None:
                self._log = self._opener()
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
    found: list[str | bytes | None] = [settings.caller_key, settings.database_password]
    ari = settings.ari
    if ari is not None:
        found += [ari.password, redaction.basic_auth_token(ari.username, ari.password)]
    if settings.ami is not None:
        found.append(settings.ami.password)
    if key is not None:
        found.append(key.key)
    return found


MODES = ("ari", "agi")
NO_AMI = "withdrawal key cannot be honoured (no ami: section: consentivr cannot hear it)"


class Service:
    """consentivr running in one mode, with everything it needs."""

    def __init__(self, settings: Settings, mode: str = "ari",
                 listen: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT)) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.settings = settings
        self.mode = mode
        self.listen = listen
        redaction.install(secrets_of(settings))
        self.ari: AriClient | None = None
        self.pool: AmiPool | None = None
        self.recording_listener: RecordingListener | None = None
        self.committer: GroupCommitter | None = None
        self.writer: ConsentWriter | None = None
        self.app: StasisApp | None = None
        self.agi: AgiServer | None = None
        self.gate = RecordingGate()
        # Metrics, /metrics + /healthz, and systemd readiness and watchdog.
        self.ops = Operations.for_settings(settings, mode="serve" if mode == "ari" else "agi")
        self._pump: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self, wait_connected: float | None = None) -> None:
        settings = self.settings
        metrics = self.ops.metrics
        await self.ops.start()  # a taken metrics port is an error before anything runs
        prepare_paths(settings)
        key = caller_key_for(settings)
        redaction.install([key.key, settings.database_password])
        # SQLite file or shared PostgreSQL log (consentivr.consentlog).
        lazy = LazyLog(settings.database, key, lambda: open_consent_log(settings, key))
        try:
            lazy.open()
            metrics.component_up("log", True)
        except StoreError as exc:
            log.error("%s; calls go on unrecorded until it works", exc)
            metrics.component_up("log", False, "consent log cannot be opened")
        self.committer = GroupCommitter(lambda: lazy)
        self.writer = writer = ConsentWriter(self.committer, observer=metrics)
        writer.start()
        # No recording starts until the withdrawal key is proven to work (fail closed).
        gate = self.gate
        if settings.ami is not None:
            # Withdrawal by key and hold muting happen outside our app, in both modes.
            self.recording_listener = RecordingListener(
                settings, observer=metrics, gate=gate, committer=self.committer)
            await self.recording_listener.start(wait=wait_connected)
            if wait_connected:
                await self.recording_listener.checked.wait()
        else:
            gate.set(NO_AMI)
            metrics.set_problem("withdrawal", NO_AMI)
            log.error("%s: recordings are not started", NO_AMI)
        if self.mode == "agi":
            self.agi = AgiServer(settings, writer, observer=metrics, gate=gate)
            await self.agi.start(*self.listen)
            self.connected.set()
            return
        if settings.ari is None:
            raise AriError("ARI mode needs an ari: section in the config")
        recorder: Recorder | _NoRecorder = _NoRecorder()
        if settings.ami is not None:
            self.pool = AmiPool(settings.ami)
            await self.pool.connect(wait=wait_connected)
            recorder = Recorder(self.pool)
        self.ari = AriClient(settings.ari)
        self.app = StasisApp(settings, self.ari, recorder, writer,
                             lookup=lookup_for(settings), observer=metrics, gate=gate)
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(self.app))
        if wait_connected:
            await asyncio.wait_for(self.connected.wait(), wait_connected)
        log.info("consentivr serving Stasis app %r with flows: %s", settings.ari.app,
                 ", ".join(settings.flows))

    async def _on_connect(self) -> None:
        assert self.ari is not None and self.settings.ari is not None
        # Only the events the app reads: the rest (about half) cost both sides JSON.
        try:
            await self.ari.set_event_filter(self.settings.ari.app, EVENT_TYPES)
        except AriError as exc:  # an older Asterisk: we just get every event
            log.info("ARI event filter not set (%s); receiving every event", exc)
        self.ops.metrics.component_up("ari", True)
        self.connected.set()
        if self.app is not None:
            self.app.events_connected()

    async def _pump_events(self, app: StasisApp) -> None:
        assert self.ari is not None and self.settings.ari is not None
        async for event in self.ari.events(
                self.settings.ari.app, on_connect=self._on_connect,
                on_lost=lambda why: self.ops.metrics.component_up("ari", False, why)):
            try:
                app.handle_event(event)
            except Exception:  # one bad event must never stop the service
                log.exception("event %r could not be handled", event.get("type"))

    async def stop(self, drain: float = 5.0) -> None:
        if self._pump is not None:
            await cancel_and_wait(self._pump)
        if self.app is not None:
            await self.app.drain(timeout=drain)
        if self.agi is not None:
            await self.agi.stop(drain=drain)
        if self.writer is not None:
            await self.writer.close(timeout=drain)
        if self.ari is not None:
            await self.ari.close()
        if self.recording_listener is not None:
            await self.recording_listener.stop()
        if self.pool is not None:
            self.pool.close()
        if self.committer is not None:
            self.committer.close()
        await self.ops.stop()


async def serve(settings: Settings, stop: asyncio.Event | None = None, *, mode: str = "ari",
                listen: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT)) -> None:
    """Run consentivr in ``mode`` until ``stop`` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    service = Service(settings, mode, listen)
    try:
        await service.start()
        await stop.wait()
    finally:
        log.info("stopping: waiting for calls in the menu")
        await service.stop()
