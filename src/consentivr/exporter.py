"""The HTTP listener for Prometheus and health checks: ``GET /metrics``, ``GET /healthz``.

Started by ``serve`` and ``agi`` when the config has ``metrics: {listen: host:port}``.
It runs on the service's own event loop (aiohttp), so a loop that is stuck also
stops answering /healthz, which is what a health check should see.

``/healthz`` answers 200 ``{"status": "ok", "components": {...}}`` when every
component the mode needs is up and no problem is set, else 503 with ``reasons``.
The process itself stays up either way: it reconnects on its own.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from consentivr.errors import ConsentivrError
from consentivr.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)


class Exporter:
    """``await start()`` binds; ``await stop()`` closes. ``port`` is the bound port."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9468) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port  # 0: any free port (tests); the real one after start()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None)  # scrapes would flood the log
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConsentivrError(f"metrics: cannot listen on {self.host}:{self.port}: "
                                  f"{exc.strerror or exc}") from exc
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d/metrics and /healthz",
                 self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Exporter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, _request: web.Request) -> web.Response:
        health = self.metrics.health
        return web.Response(status=200 if health.ok else 503,
                            text=json.dumps(health.to_json(), sort_keys=True),
                            content_type="application/json")
