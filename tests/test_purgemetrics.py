"""The purge's node_exporter textfile (``purge.metrics_file``), through the real command."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.rights import purge_command
from consentivr.purgelog import PurgeBusy, purge_lock
from consentivr.purgemetrics import previous_success, recorded_purge, render, write_run
from consentivr.retention import PurgeReport
from tests.rights_fixtures import Env, record


def textfile(env: Env) -> Path:
    return env.root / "tf" / "consentivr_purge.prom"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    textfile(e).parent.mkdir()
    with e.config.open("a") as f:
        f.write(f"purge:\n  metrics_file: {textfile(e)}\n")
    return e


def values(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def purge(env: Env, *args: str) -> int:
    result = CliRunner().invoke(purge_command, ["--config", str(env.config), *args])
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit), result.exception
    return result.exit_code


def test_a_clean_run_writes_success_and_counts(env: Env) -> None:
    env.call(file="a.wav")
    assert purge(env, "--as-of", "2026-01-01") == 0
    got = values(textfile(env))
    assert got["consentivr_purge_success"] == 1
    assert got['consentivr_purge_items{action="recordings_deleted"}'] == 1
    assert got['consentivr_purge_items{action="refused"}'] == 0
    assert got["consentivr_purge_last_success_timestamp_seconds"] == \
        got["consentivr_purge_last_run_timestamp_seconds"]
    mode = stat.S_IMODE(textfile(env).stat().st_mode)
    assert mode == 0o644  # node_exporter reads it as its own user
    assert [p.name for p in textfile(env).parent.iterdir()] == [
        "consentivr_purge.prom"]  # no temporary file left


def test_a_run_with_problems_fails_but_keeps_the_last_success(env: Env, tmp_path: Path) -> None:
    assert purge(env) == 0
    first = values(textfile(env))
    (env.rec / "link.wav").symlink_to(env.config)
    env.add(record(1, recording=str(env.rec / "link.wav")))
    assert purge(env, "--as-of", "2026-01-01") == 3
    got = values(textfile(env))
    assert got["consentivr_purge_success"] == 0
    assert got["consentivr_purge_last_success_timestamp_seconds"] == \
        first["consentivr_purge_last_success_timestamp_seconds"]
    assert got["consentivr_purge_last_run_timestamp_seconds"] >= \
        first["consentivr_purge_last_run_timestamp_seconds"]


def test_a_run_that_cannot_open_the_log_is_a_failure(env: Env) -> None:
    env.db.parent.mkdir(parents=True, exist_ok=True)
    env.db.write_bytes(b"this is not a database" * 100)
    assert purge(env) == 1
    got = values(textfile(env))
    assert got["consentivr_purge_success"] == 0
    assert "consentivr_purge_last_success_timestamp_seconds" not in got  # never succeeded


def test_busy_and_dry_runs_write_nothing(env: Env) -> None:
    env.call(file="a.wav")
    env.conn().close()
    assert purge(env, "--dry-run") == 0
    with purge_lock(env.db):
        assert purge(env) == 4
    assert not textfile(env).exists()


def test_no_metrics_file_configured_writes_nothing(tmp_path: Path) -> None:
    e = Env(tmp_path)
    assert purge(e) == 0
    assert not list(tmp_path.rglob("*.prom"))


def test_recorded_purge_table(tmp_path: Path) -> None:
    path = tmp_path / "p.prom"
    clock = iter([100.0, 110.0, 200.0, 230.0, 300.0, 301.0]).__next__
    report = PurgeReport(run_id=1, as_of=0, dry_run=False)
    with recorded_purge(path, clock=clock) as done:
        done(report)
    assert values(path)["consentivr_purge_duration_seconds"] == 10
    with pytest.raises(RuntimeError), recorded_purge(path, clock=clock):
        raise RuntimeError("disk full")
    got = values(path)
    assert (got["consentivr_purge_success"], got["consentivr_purge_last_run_timestamp_seconds"],
            got["consentivr_purge_last_success_timestamp_seconds"]) == (0, 230, 110)
    with pytest.raises(PurgeBusy), recorded_purge(path, clock=clock):
        raise PurgeBusy("held")
    assert values(path)["consentivr_purge_last_run_timestamp_seconds"] == 230  # unchanged


def test_an_unwritable_textfile_does_not_fail_the_purge(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "p.prom"
    with recorded_purge(path) as done:
        done(PurgeReport(run_id=1, as_of=0, dry_run=False))
    assert not path.exists()


def test_previous_success_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "p.prom"
    assert previous_success(path) is None
    path.write_text("consentivr_purge_last_success_timestamp_seconds soon\n")
    assert previous_success(path) is None
    write_run(path, started_at=1.0, success=True, clock=lambda: 5.0)
    assert previous_success(path) == 5.0


def test_promtool_accepts_the_textfile(tmp_path: Path) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool not installed (Debian package prometheus; ./dev setup)")
        pytest.skip("promtool not installed")
    text = render(finished_at=10.0, started_at=5.0, success=True, last_success=10.0,
                  counts=PurgeReport(run_id=1, as_of=0, dry_run=False).counts)
    run = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True,
                         timeout=60, check=False)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr
