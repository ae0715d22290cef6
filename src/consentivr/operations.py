"""What a running ``serve`` or ``agi`` shows the outside, started and stopped as one:
the metrics, the /metrics + /healthz listener (when configured), and systemd's
readiness, status line and watchdog (when started by systemd).

The service wires it once::

    async with Operations.for_settings(settings, mode="serve") as ops:
        ...  # the driver gets ops.metrics and calls its methods

``READY=1`` goes to systemd the first time every needed component is up (ARI in
serve, AMI when configured, the log); ``STATUS=`` follows every change after that;
``STOPPING=1`` is sent when the block is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from consentivr.exporter import Exporter
from consentivr.metrics import Metrics
from consentivr.notify import Notifier
from consentivr.settings import MetricsSettings, Settings
from consentivr.tasks import cancel_and_wait


class Operations:
    def __init__(self, metrics: Metrics, listen: MetricsSettings | None = None,
                 notifier: Notifier | None = None) -> None:
        self.metrics = metrics
        self.notifier = notifier if notifier is not None else Notifier()
        self.exporter = Exporter(metrics, listen.host, listen.port) if listen else None
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, mode: str,
                     environ: Mapping[str, str] | None = None) -> Operations:
        metrics = Metrics(settings.flows, mode=mode, ami=settings.ami is not None)
        return cls(metrics, settings.metrics, Notifier(environ))

    @property
    def port(self) -> int | None:
        """The listener's bound port (None without a ``metrics:`` section)."""
        return self.exporter.port if self.exporter else None

    async def start(self) -> None:
        """Bind the listener (ConsentivrError if the port is taken), then talk to systemd."""
        if self.exporter is not None:
            await self.exporter.start()
        self.notifier.follow(self.metrics.health)
        self._watchdog = self.notifier.start_watchdog()

    async def stop(self) -> None:
        self.notifier.stopping()
        if self._watchdog is not None:
            await cancel_and_wait(self._watchdog)
            self._watchdog = None
        if self.exporter is not None:
            await self.exporter.stop()
        self.notifier.close()

    async def __aenter__(self) -> Operations:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
