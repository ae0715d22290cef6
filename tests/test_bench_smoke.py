"""The benchmarks still run: ``bench/log``, ``bench/calls`` and ``bench/report --smoke``.

Not timed tests: they prove the scripts work and print their tables. The figures
themselves are in docs/performance.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from consentivr.features import applicationmap, withdraw_dialplan
from consentivr.settings import WithdrawalSettings
from consentivr_testbed.pbx import SandboxPbx, env_lines

BENCH = Path(__file__).resolve().parents[1] / "bench"
LIMIT = 60  # seconds; the smoke runs must stay fast enough for every CI run


def run(script: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True, text=True, timeout=LIMIT * 2, env=env, check=False,
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, f"bench/{script} --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, took


def table_rows(output: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (the header and the rule are left out)."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line))
    rows: dict[str, list[str]] = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_log_smoke_prints_both_commit_modes_and_the_ratio() -> None:
    out, took = run("log")
    rows = table_rows(out)
    assert set(rows) == {"single-row commits", "group commit"}
    for cells in rows.values():
        assert float(cells[2].replace(",", "")) > 0  # decisions/s
    assert re.search(r"group commit / single-row = \d+(\.\d)?x", out)
    assert took < LIMIT


@pytest.mark.postgres
def test_log_smoke_on_postgres_prints_one_and_two_nodes(pg_server: Any) -> None:
    env = {**os.environ, "PGPASSWORD": pg_server.password}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "log"), "--smoke", "--postgres", pg_server.new_database()],
        capture_output=True, text=True, timeout=LIMIT * 2, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert {"postgres group commit, 1 node", "postgres group commit, 2 nodes"} <= set(rows)
    assert float(rows["postgres group commit, 2 nodes"][2].replace(",", "")) > 0
    assert re.search(r"postgres 2 nodes / sqlite group commit = \d+\.\d\dx", proc.stdout)
    assert time.monotonic() - started < LIMIT


@pytest.mark.asterisk
def test_calls_smoke_prints_a_row_per_mode(pbx: Any) -> None:
    env = dict(os.environ)
    if isinstance(pbx, SandboxPbx):
        # Point the bench at the session's PBX, as the tests' own env would.
        for line in env_lines(pbx):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
        env["CONSENTIVR_TEST_ASTERISK_PID"] = str(pbx.pid() or "")
    # The bench sees this PBX as "your own Asterisk": install the withdrawal parts a
    # production PBX has, or consentivr (rightly) records nothing.
    withdrawal = WithdrawalSettings()
    pbx.set_withdrawal(applicationmap(withdrawal), withdraw_dialplan(withdrawal))
    out, took = run("calls", env)
    rows = table_rows(out)
    modes = {"ARI ws", "ARI http", "dialplan"}
    if importlib.util.find_spec("consentivr.agi") is not None:
        modes.add("FastAGI")
    assert set(rows) == modes
    for mode, cells in rows.items():
        assert cells[1] == "4/4", f"{mode}: not every smoke call completed: {cells}"
    # consentivr's CPU is measured for both of its modes; the baseline has none.
    for mode in modes - {"dialplan"}:
        assert re.fullmatch(r"\d+\.\d\d", rows[mode][4]), rows[mode]
    # The requests per call, by transport: each ARI row used only its own.
    http, ws = (float(n) for n in rows["ARI ws"][11].split("/"))
    assert ws > 0 and http == 0, rows["ARI ws"]
    http, ws = (float(n) for n in rows["ARI http"][11].split("/"))
    assert http > 0 and ws == 0, rows["ARI http"]
    if "FastAGI" in rows:
        assert float(rows["FastAGI"][12]) > 0, rows["FastAGI"]
    assert took < LIMIT


def test_report_smoke_prints_the_report_the_baseline_and_the_ratio() -> None:
    out, took = run("report")
    rows = table_rows(out)
    assert set(rows) == {"consentivr report (html)", "baseline: GROUP BY flow"}
    for cells in rows.values():
        assert float(cells[1]) > 0  # median seconds
    assert re.search(r"report / baseline = \d+(\.\d)?x", out)
    assert re.search(r"peak RSS of the report: \d+ MB", out)
    assert took < LIMIT
