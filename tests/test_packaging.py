"""The systemd units, the Prometheus rules and the Grafana dashboard, checked with the
real tools: ``systemd-analyze verify``, ``promtool check rules``, ``promtool test rules``."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consentivr.metrics import Metrics

ROOT = Path(__file__).parent.parent
SYSTEMD = ROOT / "packaging" / "systemd"
PROMETHEUS = ROOT / "packaging" / "prometheus"
UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer"))
INSTALLED = "/opt/consentivr/bin/consentivr"  # README: python3 -m venv /opt/consentivr


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} not installed (Debian package {package}; ./dev setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=dict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


def verify(tmp_path: Path, names: list[str], edit: dict[str, str] | None = None) -> str:
    """``systemd-analyze verify`` on copies whose ExecStart names this venv's consentivr
    (verify checks that the binary exists); returns what it printed."""
    exe = str(Path(sys.executable).parent / "consentivr")
    for name in names:
        text = (SYSTEMD / name).read_text().replace(INSTALLED, exe)
        for old, new in (edit or {}).items():
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    run = subprocess.run([tool("systemd-analyze", "systemd"), "verify", "--man=no",
                          *(str(tmp_path / n) for n in names)],
                         capture_output=True, text=True, timeout=120, check=False)
    return (f"exit {run.returncode}\n" if run.returncode else "") + run.stdout + run.stderr


def test_the_units_are_there() -> None:
    assert UNITS == ["consentivr-agi.service", "consentivr-purge.service",
                     "consentivr-purge.timer", "consentivr.service"]


def test_systemd_analyze_verify_passes_on_every_unit(tmp_path: Path) -> None:
    assert verify(tmp_path, UNITS) == ""


def test_systemd_analyze_verify_would_catch_a_typo(tmp_path: Path) -> None:
    out = verify(tmp_path, ["consentivr.service"],
                 {"Restart=always": "Restart=always\nRestrat=always"})
    assert "Unknown key 'Restrat'" in out


@pytest.mark.parametrize("name", ["consentivr.service", "consentivr-agi.service"])
def test_service_units_notify_restart_and_are_hardened(name: str) -> None:
    s = unit(name)["Service"]
    assert (s["Type"], s["Restart"], s["UMask"]) == ("notify", "always", "0077")
    assert s["WatchdogSec"] and s["NotifyAccess"] == "main"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute"):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict"
    # Write access: the consent log's dir and the recordings dir, nothing else.
    assert s["ReadWritePaths"].split() == ["/var/lib/consentivr",
                                           "/var/spool/asterisk/consentivr"]
    assert s["CapabilityBoundingSet"] == ""
    mode = "serve" if name == "consentivr.service" else "agi"
    assert s["ExecStart"].split()[:2] == [INSTALLED, mode]
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"


def test_every_unit_runs_the_installed_binary_and_documents_a_real_file() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv /opt/consentivr" in readme
    assert "/usr/share/doc/consentivr" in readme  # the install step that puts the docs there
    for name in UNITS:
        parsed = unit(name)
        if name.endswith(".service"):
            assert parsed["Service"]["ExecStart"].startswith(INSTALLED + " "), name
        doc = parsed["Unit"].get("Documentation")
        if doc:
            match = re.fullmatch(r"file:///usr/share/doc/consentivr/(.+)", doc)
            assert match, doc
            assert (ROOT / match[1]).exists() or (ROOT / "docs" / match[1]).exists(), doc


# --- Prometheus ------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    run = subprocess.run([tool("promtool", "prometheus"), "check", "rules",
                          str(PROMETHEUS / "consentivr-alerts.yml")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 7 rules found" in run.stdout


def test_promtool_test_rules_the_alerts_fire_when_they_should() -> None:
    run = subprocess.run([tool("promtool", "prometheus"), "test", "rules",
                          "consentivr-alerts.test.yml"], cwd=PROMETHEUS,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_issue_asks_for_these_alerts() -> None:
    text = (PROMETHEUS / "consentivr-alerts.yml").read_text()
    for alert in ("ConsentivrPurgeNotSuccessful", "ConsentivrAriDown", "ConsentivrAmiDown",
                  "ConsentivrRecordingsFailing", "ConsentivrLogNotWritable"):
        assert f"alert: {alert}\n" in text


def _exposed() -> set[str]:
    names = set()
    for line in Metrics().exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names |= ({f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                      if kind == "histogram" else {name})
    return names


PURGE_SERIES = {"consentivr_purge_last_run_timestamp_seconds", "consentivr_purge_success",
                "consentivr_purge_last_success_timestamp_seconds",
                "consentivr_purge_duration_seconds", "consentivr_purge_items"}


def _used(text: str) -> set[str]:
    return set(re.findall(r"\bconsentivr_[a-z_]*[a-z]", text))


def test_rules_and_dashboard_use_only_series_that_exist() -> None:
    known = _exposed() | PURGE_SERIES
    rules = (PROMETHEUS / "consentivr-alerts.yml").read_text()
    assert _used(rules) - known == set()
    dashboard = json.loads((PROMETHEUS / "consentivr-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert _used(exprs) - known == set()
    assert {"consentivr_calls_total", "consentivr_decisions_total",
            "consentivr_recordings_total"} <= _used(exprs)


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression of a rules file: the dashboard's go in as
    # recording rules, with Grafana's $instance variable filled in.
    dashboard = json.loads((PROMETHEUS / "consentivr-dashboard.json").read_text())
    exprs = [t["expr"].replace("$instance", ".*") for p in dashboard["panels"]
             for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    run = subprocess.run([tool("promtool", "prometheus"), "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in run.stdout
