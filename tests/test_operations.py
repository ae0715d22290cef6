"""Operations as the service will use it: a real notify socket, real HTTP, one lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path

import aiohttp

from consentivr.configfile import load_settings
from consentivr.flow import DecisionRecord
from consentivr.metrics import Metrics
from consentivr.notify import Notifier
from consentivr.operations import Operations
from consentivr.settings import MetricsSettings
from consentivr.store import CallerKey, ConsentLog
from consentivr.withdrawal import RecordingLog
from tests.ops_fixtures import metrics_vs_log, scrape
from tests.rights_fixtures import CONFIG, Env, record


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


# --- the e2e helper: metrics against the consent log -----------------------------------


def _drive(m: Metrics, rec: DecisionRecord) -> None:
    """What the driver does for one logged row (see the report's wiring list)."""
    m.call_ended(rec.flow, rec.outcome)
    m.decisions(rec.flow, rec.decisions)


def test_the_metrics_equal_the_log_when_driven_like_the_driver(tmp_path: Path) -> None:
    env = Env(tmp_path)
    rows = [record(1, recording=str(env.rec / "c1.wav")), record(2), record(3, callback=True),
            dataclasses.replace(record(4), flow="gone", outcome="error: ARI down")]
    env.add(*rows)
    log = ConsentLog(env.db, CallerKey(b"k"))
    try:
        log.mark_recording("c1", True, None, 1.0)
        log.void_late_consent("c3", "late", 3.0)
    finally:
        log.close()
    marks = RecordingLog(env.db)
    try:
        assert marks.withdraw("c1", 2.0, "agent", True)  # first: counted
    finally:
        marks.close()
    flows = load_settings(env.config).flows
    m = Metrics(flows)
    for rec in rows:
        _drive(m, rec)
    m.recording("started")
    m.withdrawal("agent")
    m.withdrawal("system")

    async def main() -> list[str]:
        async with Operations(m, MetricsSettings("127.0.0.1", 0), Notifier({})) as ops:
            assert ops.port is not None
            return metrics_vs_log(await scrape(ops.port), env.db, flows)

    assert asyncio.run(main()) == []
    # The check can fail: one call too many in the metrics is named.
    m.call_ended("main", "completed")
    text = m.exposition().decode()
    assert metrics_vs_log(text, env.db, flows) == [
        "consentivr_calls_total{'flow': 'main', 'outcome': 'completed'}: metrics 4, log 3"]
