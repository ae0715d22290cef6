"""Operations as the service will use it: a real notify socket, real HTTP, one lifecycle."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp

from consentivr.config import MetricsSettings, load_settings
from consentivr.metrics import Metrics
from consentivr.notify import Notifier
from consentivr.operations import Operations
from tests.rights_fixtures import CONFIG


def test_lifecycle_ready_status_watchdog_health_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(address)
    systemd.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})  # 1 s

    def received(ping: bool = False) -> str:
        """The next message; watchdog pings (every second) are skipped unless asked for."""
        while True:
            text = systemd.recv(4096).decode()
            if ping or text != "WATCHDOG=1":
                return text

    async def main() -> None:
        ops = Operations(Metrics(mode="agi"), MetricsSettings("127.0.0.1", 0), notifier)
        async with ops, aiohttp.ClientSession() as http:
            assert await asyncio.to_thread(received) == (
                "STATUS=degraded: ami: not connected yet; log: not connected yet")
            assert await asyncio.to_thread(received, True) == "WATCHDOG=1"
            url = f"http://127.0.0.1:{ops.port}/healthz"
            async with http.get(url) as resp:
                assert resp.status == 503
            ops.metrics.component_up("ami", True)
            ops.metrics.component_up("log", True)
            assert await asyncio.to_thread(received) == "STATUS=degraded: log: not connected yet"
            assert await asyncio.to_thread(received) == "READY=1\nSTATUS=ready: ami up, log up"
            async with http.get(url) as resp:
                assert resp.status == 200 and json.loads(await resp.text())["status"] == "ok"
        assert await asyncio.to_thread(received) == "STOPPING=1"

    try:
        asyncio.run(main())
    finally:
        systemd.close()


def test_without_metrics_section_there_is_no_listener_and_counting_still_works(
        tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(db=tmp_path / "c.db", rec=tmp_path / "rec", log_days=730))
    settings = load_settings(config)

    async def main() -> None:
        async with Operations.for_settings(settings, "serve", environ={}) as ops:
            assert ops.port is None and ops.exporter is None
            ops.metrics.call_ended("main", "completed")
            assert ops.metrics.sample("consentivr_calls_total",
                                      {"flow": "main", "outcome": "completed"}) == 1
            # No ami: section in this config: serve needs ARI and the log only.
            assert ops.metrics.health.needed == ("ari", "log")

    asyncio.run(main())
