"""Metrics, health and their HTTP listener (issue 15): the series, bounded labels,
/metrics and /healthz over real HTTP, and the ``metrics:``/``purge:`` config keys."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest

from consentivr import __version__
from consentivr.configfile import load_settings
from consentivr.errors import ConfigError, ConsentivrError
from consentivr.exporter import Exporter
from consentivr.health import Health, needed_components
from consentivr.metrics import Metrics, outcome_class
from consentivr.model import Decision
from tests.rights_fixtures import CONFIG

CALLER = "+31201234567"


def flows() -> dict:
    # flow "main" with the purposes recording and callback
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(CONFIG.format(db=Path(tmp) / "c.db", rec=tmp, log_days=730))
        return dict(load_settings(path).flows)


def load_settings_lenient(path: Path):  # the example names password files: not read here
    return load_settings(path, secrets=())


def exposition_series(m: Metrics) -> set[str]:
    names = set()
    for line in m.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# --- the series ------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "ami", "up_gauges"), [
    ("serve", True, {"consentivr_ari_up", "consentivr_ami_up", "consentivr_log_writable"}),
    ("agi", True, {"consentivr_ami_up", "consentivr_log_writable"}),
    ("serve", False, {"consentivr_ari_up", "consentivr_log_writable"}),
    ("agi", False, {"consentivr_log_writable"}),
])
def test_the_series_of_the_issue_per_mode(mode: str, ami: bool, up_gauges: set[str]) -> None:
    m = Metrics(flows(), mode=mode, ami=ami)
    m.log_commit(0.001)
    hist = {f"consentivr_log_commit_seconds_{s}" for s in ("bucket", "count", "sum")}
    assert exposition_series(m) == {
        "consentivr_calls_total", "consentivr_decisions_total", "consentivr_recordings_total",
        "consentivr_withdrawals_total", "consentivr_calls_in_menu", "consentivr_build_info",
        *hist, *up_gauges}
    assert m.sample("consentivr_build_info", {"version": __version__}) == 1


def test_known_series_start_at_zero() -> None:
    m = Metrics(flows())
    assert m.sample("consentivr_calls_total", {"flow": "main", "outcome": "completed"}) == 0
    assert m.sample("consentivr_decisions_total",
                    {"flow": "main", "purpose": "callback", "decision": "no_answer"}) == 0
    assert m.sample("consentivr_recordings_total", {"result": "failed"}) == 0
    assert m.sample("consentivr_withdrawals_total", {"by": "agent"}) == 0


@pytest.mark.parametrize(("outcome", "label"), [
    ("completed", "completed"),
    ("abandoned", "abandoned"),
    ("timeout", "timeout"),
    ("error: not logged before the call went on (database is locked)", "error"),
    ("error", "error"),
    ("ERROR: x", "error"),
    (f"hung up by {CALLER}", "other"),
    ("", "other"),
])
def test_outcomes_are_bounded(outcome: str, label: str) -> None:
    assert outcome_class(outcome) == label
    m = Metrics(flows())
    m.call_ended("main", outcome)
    assert m.sample("consentivr_calls_total", {"flow": "main", "outcome": label}) == 1


def test_counts_follow_the_calls() -> None:
    m = Metrics(flows())
    m.call_ended("main", "completed")
    m.call_ended("main", "completed")
    m.decisions("main", {"recording": Decision.YES, "callback": Decision.NO})
    m.decision("main", "recording", "no_answer")
    m.recording("started")
    m.recording("failed")
    m.withdrawal("caller")
    m.withdrawal("agent")
    m.withdrawal("agent")
    for _ in range(3):
        m.menu_entered()
    m.menu_left()
    for s in (0.0007, 0.003, 0.2):
        m.log_commit(s)
    sample = m.sample
    assert sample("consentivr_calls_total", {"flow": "main", "outcome": "completed"}) == 2
    assert sample("consentivr_decisions_total",
                  {"flow": "main", "purpose": "recording", "decision": "yes"}) == 1
    assert sample("consentivr_decisions_total",
                  {"flow": "main", "purpose": "recording", "decision": "no_answer"}) == 1
    assert sample("consentivr_decisions_total",
                  {"flow": "main", "purpose": "callback", "decision": "no"}) == 1
    assert sample("consentivr_recordings_total", {"result": "started"}) == 1
    assert sample("consentivr_recordings_total", {"result": "failed"}) == 1
    assert sample("consentivr_withdrawals_total", {"by": "agent"}) == 2
    assert sample("consentivr_calls_in_menu") == 2
    assert sample("consentivr_log_commit_seconds_count") == 3
    assert sample("consentivr_log_commit_seconds_bucket", {"le": "0.001"}) == 1
    assert sample("consentivr_log_commit_seconds_bucket", {"le": "0.25"}) == 3


@pytest.mark.parametrize("call", [
    lambda m: m.call_ended(CALLER, "completed"),
    lambda m: m.call_ended("main", f"error: {CALLER} hung up"),
    lambda m: m.decision(CALLER, "recording", "yes"),
    lambda m: m.decision("main", CALLER, "yes"),
    lambda m: m.decision("main", "recording", CALLER),
    lambda m: m.withdrawal(CALLER),
])
def test_no_caller_data_reaches_a_label(call) -> None:
    m = Metrics(flows())
    before = len(m.exposition().splitlines())
    call(m)
    text = m.exposition().decode()
    assert CALLER not in text and "31201234567" not in text
    # At most the one "(unknown)" series is new: free text cannot grow the series.
    assert len(text.splitlines()) <= before + 1


def test_unknown_values_map_to_unknown_not_a_new_series_per_value() -> None:
    m = Metrics(flows())
    for n in range(50):
        m.call_ended(f"flow{n}", "completed")
    assert m.sample("consentivr_calls_total", {"flow": "(unknown)", "outcome": "completed"}) == 50


def test_recording_result_is_checked() -> None:
    with pytest.raises(ValueError, match="recording result"):
        Metrics().recording("maybe")


def test_component_gauges_and_health_move_together() -> None:
    m = Metrics(mode="serve")
    assert m.sample("consentivr_ami_up") == 0 and not m.health.ok
    for name in ("ari", "ami", "log"):
        m.component_up(name, True)
    assert m.sample("consentivr_ari_up") == 1 and m.sample("consentivr_log_writable") == 1
    assert m.health.ok
    m.component_up("ami", False, "connection refused")
    assert m.sample("consentivr_ami_up") == 0
    assert m.health.reasons() == ["ami: connection refused"]
    with pytest.raises(ValueError, match="unknown component"):
        m.component_up("db", True)


# --- health (sans-IO) --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "ami", "needed"), [
    ("serve", True, ("ari", "ami", "log")),
    ("serve", False, ("ari", "log")),
    ("agi", True, ("ami", "log")),
    ("agi", False, ("log",)),
])
def test_needed_components_depend_on_mode(mode: str, ami: bool, needed: tuple) -> None:
    assert needed_components(mode, ami) == needed


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        needed_components("ami")


def test_health_table() -> None:
    h = Health(("ami", "log"))
    changes: list[str] = []
    h.on_change(lambda x: changes.append(x.summary()))
    assert h.to_json() == {"status": "unhealthy", "components": {"ami": "down", "log": "down"},
                           "reasons": ["ami: not connected yet", "log: not connected yet"]}
    h.component_up("ari", False)  # not needed in this mode: no effect
    h.component_up("ami", True)
    h.component_up("log", True)
    assert h.ok and h.to_json() == {"status": "ok", "components": {"ami": "up", "log": "up"}}
    h.set_problem("withdrawal", "withdrawal path not verified")
    assert not h.ok and h.reasons() == ["withdrawal: withdrawal path not verified"]
    h.set_problem("withdrawal", "withdrawal path not verified")  # same: no change
    h.set_problem("withdrawal", None)
    assert h.ok
    assert changes == [
        "degraded: log: not connected yet", "ready: ami up, log up",
        "degraded: withdrawal: withdrawal path not verified", "ready: ami up, log up"]


# --- the listener over real HTTP ----------------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def test_metrics_and_healthz_over_http() -> None:
    async def main() -> None:
        m = Metrics(flows(), mode="serve")
        async with Exporter(m, "127.0.0.1", 0) as ex, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{ex.port}"
            status, ctype, body = await _get(s, f"{base}/healthz")
            assert status == 503 and ctype.startswith("application/json")
            assert json.loads(body)["reasons"] == [
                "ari: not connected yet", "ami: not connected yet", "log: not connected yet"]
            for name in ("ari", "ami", "log"):
                m.component_up(name, True)
            status, _, body = await _get(s, f"{base}/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
            # AMI dropped: 503 with the reason; back: 200.
            m.component_up("ami", False, "connection lost")
            status, _, body = await _get(s, f"{base}/healthz")
            assert status == 503 and json.loads(body)["reasons"] == ["ami: connection lost"]
            m.component_up("ami", True)
            m.set_problem("withdrawal", "withdrawal path not verified")
            status, _, body = await _get(s, f"{base}/healthz")
            assert status == 503
            assert json.loads(body)["reasons"] == ["withdrawal: withdrawal path not verified"]
            m.set_problem("withdrawal", None)
            assert (await _get(s, f"{base}/healthz"))[0] == 200

            m.call_ended("main", "completed")
            status, ctype, body = await _get(s, f"{base}/metrics")
            assert status == 200 and ctype.startswith("text/plain")
            assert 'consentivr_calls_total{flow="main",outcome="completed"} 1.0' in body
            assert (await _get(s, f"{base}/nope"))[0] == 404

    asyncio.run(main())


def test_a_taken_port_is_one_clear_error() -> None:
    async def main() -> None:
        async with Exporter(Metrics(), "127.0.0.1", 0) as first:
            second = Exporter(Metrics(), "127.0.0.1", first.port)
            with pytest.raises(ConsentivrError, match=f"cannot listen on 127.0.0.1:{first.port}"):
                await second.start()

    asyncio.run(main())


# --- promtool check metrics ------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if __import__("os").environ.get("CI", "").lower() == "true":
            pytest.fail("promtool not installed (Debian package prometheus; ./dev setup)")
        pytest.skip("promtool not installed (Debian package prometheus; ./dev setup)")
    return path


def test_promtool_accepts_the_exposition() -> None:
    m = Metrics(flows(), mode="serve")
    m.call_ended("main", "completed")
    m.call_ended("main", "error: ARI gone")
    m.decisions("main", {"recording": Decision.YES, "callback": Decision.NO_ANSWER})
    m.recording("started")
    m.recording("failed")
    m.withdrawal("caller")
    m.menu_entered()
    m.log_commit(0.002)
    for name in ("ari", "ami", "log"):
        m.component_up(name, True)
    run = subprocess.run([promtool(), "check", "metrics"], input=m.exposition(),
                         capture_output=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == b"" and run.stderr.strip() == b""


def test_promtool_would_flag_a_bad_exposition() -> None:
    # The check above can fail: promtool names a counter without _total.
    bad = b"# HELP consentivr_calls Calls.\n# TYPE consentivr_calls counter\nconsentivr_calls 1\n"
    run = subprocess.run([promtool(), "check", "metrics"], input=bad, capture_output=True,
                         timeout=60, check=False)
    assert run.returncode != 0 and b'should have "_total" suffix' in run.stdout + run.stderr


# --- config -----------------------------------------------------------------------


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "c.db", rec=tmp_path / "rec", log_days=730)
                    + extra)
    return path


@pytest.mark.parametrize(("extra", "host", "port"), [
    ("", None, None),
    ("metrics: {listen: \"127.0.0.1:9468\"}\n", "127.0.0.1", 9468),
    ("metrics:\n  listen: \"[::1]:9500\"\n", "::1", 9500),
    ("metrics:\n  listen: localhost:1\n", "localhost", 1),
])
def test_metrics_section(tmp_path: Path, extra: str, host: str | None, port: int | None) -> None:
    settings = load_settings(_config(tmp_path, extra))
    if host is None:
        assert settings.metrics is None
    else:
        assert settings.metrics is not None
        assert (settings.metrics.host, settings.metrics.port) == (host, port)


@pytest.mark.parametrize(("extra", "message"), [
    ("metrics: {listen: \"9468\"}\n", ":35:19: metrics.listen: expected host:port"),
    ("metrics: {listen: \"a:70000\"}\n", ":35:19: metrics.listen: expected host:port"),
    ("metrics: {listen: \"a:1\", port: 3}\n", ":35:26: metrics.port: unknown key"),
    ("metrics: {}\n", ":35:10: metrics: missing required key 'listen'"),
    ("metrics: yes\n", ":35:10: metrics: expected a mapping"),
    ("purge: {metrics_file: purge.txt}\n", ":35:23: purge.metrics_file: expected a file name "
                                           "ending in .prom"),
    ("purge: {metricsfile: a.prom}\n", ":35:9: purge.metricsfile: unknown key"),
])
def test_bad_sections_are_positioned_errors(tmp_path: Path, extra: str, message: str) -> None:
    path = _config(tmp_path, extra)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert any(line.startswith(str(path)) and message in line for line in info.value.problems), \
        info.value.problems


def test_purge_metrics_file_is_relative_to_the_config(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, "purge:\n  metrics_file: tf/purge.prom\n"))
    assert settings.purge.metrics_file == tmp_path / "tf" / "purge.prom"
    assert load_settings(_config(tmp_path, "")).purge.metrics_file is None


def test_the_example_config_listens_on_loopback() -> None:
    settings = load_settings_lenient(Path(__file__).parent.parent / "config.example.yaml")
    assert settings.metrics is not None
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9468)
