"""`consentivr purge` on real SQLite files and real recording files in a temp dir."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.rights import purge_command
from consentivr.purgelog import PurgeBusy, purge_lock
from consentivr.retention import PurgeOptions, PurgeReport, parse_as_of, seqs_of
from consentivr.store import PERSONAL_FIELDS
from tests.rights_fixtures import BACKENDS, DAY, T0, Env, backend_env, record

REC_UNTIL = T0 + 90 * DAY  # a default recording's deadline


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    return backend_env(request, tmp_path)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Env:
    """The SQLite file only: its lock file and its bytes (PostgreSQL's purge lock is
    tested in tests/test_pgstore.py)."""
    return Env(tmp_path)


def purge(env: Env, as_of: float, **kw: object) -> PurgeReport:
    opts = PurgeOptions(as_of=as_of, log_retention_days=env.log_days, **kw)  # type: ignore[arg-type]
    return env.purge(opts)


def snapshot(env: Env) -> tuple[list[tuple[object, ...]], dict[str, bytes]]:
    rows = [tuple(r) for r in env.query("SELECT * FROM calls ORDER BY seq")]
    files = {p: (env.rec / p).read_bytes() for p in env.files()
             if not (env.rec / p).is_symlink()}
    return rows, files


# --- retention boundaries, to the second ------------------------------------------


@pytest.mark.parametrize(("offset", "deleted"), [(-1, False), (0, True), (1, True)])
def test_recording_goes_at_its_deadline_to_the_second(env: Env, offset: int,
                                                      deleted: bool) -> None:
    seq = env.call(file="c1.wav")
    report = purge(env, REC_UNTIL + offset)
    assert (env.rec / "c1.wav").exists() is not deleted
    assert (env.row(seq)["recording_purged_at"] is not None) is deleted
    assert report.counts["recordings_deleted"] == int(deleted)


@pytest.mark.parametrize(("offset", "redacted"), [(-1, False), (0, True), (1, True)])
def test_log_row_redacted_at_log_retention_to_the_second(env: Env, offset: int,
                                                         redacted: bool) -> None:
    seq = env.call()
    report = purge(env, T0 + env.log_days * DAY + offset)
    row = env.row(seq)
    assert (row["redacted_at"] is not None) is redacted
    assert (row["caller_hash"] is None) is redacted
    assert report.counts["rows_redacted"] == int(redacted)
    # The proof stays either way: what was decided, when, on which notice.
    assert json.loads(row["decisions"])["recording"] == "no"
    assert row["decided_at"] and row["notice_version"] == "nv1"


@pytest.mark.parametrize(("offset", "cleared"), [(-1, False), (0, True), (1, True)])
def test_callback_number_cleared_when_the_callback_purpose_ends(env: Env, offset: int,
                                                               cleared: bool) -> None:
    seq = env.call(callback=True)
    assert env.row(seq)["caller_number"] == "+31201234567"
    report = purge(env, T0 + 30 * DAY + offset)
    row = env.row(seq)
    assert (row["caller_number"] is None) is cleared
    assert row["caller_hash"] is not None  # the pseudonym stays until log retention
    assert report.counts["callers_cleared"] == int(cleared)


def test_redaction_removes_every_personal_field_and_the_salt(env: Env) -> None:
    seq = env.call(callback=True, file="c1.wav")
    purge(env, T0 + env.log_days * DAY)
    row = env.row(seq)
    assert all(row[k] is None for k in PERSONAL_FIELDS)
    assert row["personal_salt"] is None and row["personal_digest"]
    assert not (env.rec / "c1.wav").exists()


def test_log_retention_shorter_than_recording_retention_deletes_the_recording(
        tmp_path: Path) -> None:
    env = Env(tmp_path, log_days=30)
    seq = env.call(file="c1.wav", recording_days=365)
    report = purge(env, T0 + 31 * DAY)
    assert not (env.rec / "c1.wav").exists()
    row = env.row(seq)
    assert row["redacted_at"] is not None and row["recording_purged_at"] is not None
    assert report.counts == {**report.counts, "recordings_deleted": 1, "rows_redacted": 1}


@pytest.mark.parametrize("as_of", ["2025-09-13T15:06:40Z", "2025-09-13T17:06:40+02:00",
                                   "2025-09-13T15:06:40"])
def test_as_of_accepts_iso_forms(as_of: str) -> None:
    assert parse_as_of(as_of) == REC_UNTIL


# --- dry run, idempotence, the purge log ---------------------------------------------


def _mixed(env: Env) -> None:
    env.call(file="old.wav")  # 1: recording expired, row past log retention
    env.call(file="new.wav", decided_at=T0 + 50 * DAY)  # 2: kept
    env.call(callback=True, decided_at=T0 + 50 * DAY)  # 3: callback number expired
    env.call(file="", decided_at=T0)  # 4: missing recording, row past log retention
    env.call(callback=True, decided_at=T0)  # 5: callback expired, row past log retention
    env.call(file="late.wav", decided_at=T0 - 100 * DAY, recording_days=400)  # 6: log first
    env.write("orphan.wav")


def test_dry_run_changes_nothing_and_lists_what_would_go(tmp_path: Path) -> None:
    env = Env(tmp_path, log_days=100)
    _mixed(env)
    before = snapshot(env)
    report = purge(env, T0 + 101 * DAY, dry_run=True, delete_orphans=True, orphan_grace=0)
    assert snapshot(env) == before
    assert sorted(seqs_of(report.items, "recording_deleted")) == [1, 6]
    assert seqs_of(report.items, "recording_missing") == [4]
    assert sorted(seqs_of(report.items, "redacted")) == [1, 4, 5, 6]
    assert seqs_of(report.items, "caller_cleared") == [3]
    assert ("orphan_deleted", None, "orphan.wav") in report.items
    [run] = env.query("SELECT * FROM purge_runs")
    assert run["dry_run"] == 1 and run["recordings_deleted"] == 2
    assert env.query("SELECT * FROM purge_items") == []


def test_dry_run_predicts_the_real_run(tmp_path: Path) -> None:
    reports = []
    for name, dry_run in (("dry", True), ("real", False)):
        env = Env(tmp_path / name, log_days=100)
        _mixed(env)
        report = purge(env, T0 + 101 * DAY, dry_run=dry_run, delete_orphans=True,
                       orphan_grace=0)
        items = sorted((a, s, p and p.replace(str(env.rec), "REC")) for a, s, p in report.items)
        reports.append((report.counts, items))
    assert reports[0] == reports[1]


def test_a_second_run_does_nothing(env: Env) -> None:
    for _ in range(5):
        env.call(file=f"c{env._next}.wav", callback=True)
    first = purge(env, T0 + 800 * DAY)
    assert first.counts["recordings_deleted"] == 5 and first.counts["rows_redacted"] == 5
    second = purge(env, T0 + 800 * DAY)
    assert not any(second.counts.values()), second.counts
    assert second.items == []


def test_purge_log_records_every_run_and_which_rows(env: Env) -> None:
    a = env.call(file="a.wav")
    env.call(file="b.wav", decided_at=T0 + 10 * DAY)
    report = purge(env, REC_UNTIL)
    runs = env.query("SELECT * FROM purge_runs ORDER BY id")
    assert [(r["kind"], r["dry_run"], r["status"], r["recordings_deleted"]) for r in runs] == [
        ("purge", 0, "done", 1)]
    assert runs[0]["as_of"] == "2025-09-13T15:06:40.000000Z"
    assert runs[0]["head_seq"] == 2 and runs[0]["finished_at"]
    items = env.query("SELECT run_id, seq, action, state FROM purge_items")
    assert [tuple(i) for i in items] == [(report.run_id, a, "recording_deleted", "done")]


def test_a_held_lock_means_busy(sqlite_env: Env) -> None:
    env = sqlite_env
    env.call(file="a.wav")
    with purge_lock(env.db), pytest.raises(PurgeBusy):
        purge(env, REC_UNTIL)
    assert (env.rec / "a.wav").exists()


# --- safety ----------------------------------------------------------------------------


def test_a_symlink_pointing_outside_survives_and_so_does_its_target(env: Env,
                                                                   tmp_path: Path) -> None:
    outside = tmp_path / "precious.wav"
    outside.write_bytes(b"keep me")
    (env.rec / "link.wav").symlink_to(outside)
    seq = env.call(file="")  # the row names recordings/c1.wav ...
    env.add(record(99, recording=str(env.rec / "link.wav")))  # ... and this one the link
    report = purge(env, REC_UNTIL + DAY, delete_orphans=True, orphan_grace=0)
    assert (env.rec / "link.wav").is_symlink() and outside.read_bytes() == b"keep me"
    assert env.row(seq + 1)["recording_purged_at"] is None
    assert report.counts["refused"] == 1
    assert any("link.wav" in p and "not a regular file" in p for p in report.problems)


def test_a_symlinked_directory_is_not_entered(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "c1.wav").write_bytes(b"keep me")
    os.utime(outside / "c1.wav", (T0, T0))
    (env.rec / "sub").symlink_to(outside, target_is_directory=True)
    env.add(record(1, recording=str(env.rec / "sub" / "c1.wav")))
    report = purge(env, REC_UNTIL + DAY, delete_orphans=True, orphan_grace=0)
    assert (outside / "c1.wav").read_bytes() == b"keep me"
    assert report.counts["refused"] == 1 and report.counts["orphans_deleted"] == 0


@pytest.mark.parametrize("path", [
    "{rec}/../outside.wav", "{rec}/./c1.wav", "{rec}//c1.wav", "{root}/outside.wav",
    "/etc/hostname", "{rec}x/c1.wav",
])
def test_paths_outside_or_with_dot_components_are_left_alone(env: Env, tmp_path: Path,
                                                             path: str) -> None:
    (tmp_path / "outside.wav").write_bytes(b"keep")
    os.utime(tmp_path / "outside.wav", (T0, T0))
    env.write("c1.wav", b"keep too")
    env.add(record(1, recording=path.format(rec=env.rec, root=tmp_path)))
    report = purge(env, REC_UNTIL + DAY)
    assert (tmp_path / "outside.wav").read_bytes() == b"keep"
    assert (env.rec / "c1.wav").read_bytes() == b"keep too"
    assert report.counts["refused"] == 1 and env.row(1)["recording_purged_at"] is None


def test_files_in_subdirectories_are_purged(env: Env) -> None:
    seq = env.call(file="2025/06/c1.wav")
    purge(env, REC_UNTIL)
    assert not (env.rec / "2025/06/c1.wav").exists()
    assert env.row(seq)["recording_purged_at"] is not None


@pytest.mark.parametrize("name", [
    "with space.wav", "quote'.wav", 'double"quote.wav', "new\nline.wav", "tab\t.wav",
    "-dash.wav", "ünïcödé.wav", "back\\slash.wav",
])
def test_odd_file_names_are_purged(env: Env, name: str) -> None:
    seq = env.call(file=name)
    keep = env.call(file=f"keep {name}", decided_at=T0 + DAY)
    report = purge(env, REC_UNTIL)
    assert not (env.rec / name).exists()
    assert (env.rec / f"keep {name}").exists()
    assert env.row(seq)["recording_purged_at"] is not None
    assert env.row(keep)["recording_purged_at"] is None
    assert report.counts["recordings_deleted"] == 1


def test_a_recording_of_a_call_in_progress_survives(env: Env) -> None:
    # The row is past its deadline (a bad clock, a huge --as-of), but the file is
    # still being written: its mtime is now.
    seq = env.call(file="live.wav", mtime=time.time())
    report = purge(env, REC_UNTIL + DAY)
    assert (env.rec / "live.wav").exists()
    assert env.row(seq)["recording_purged_at"] is None
    assert report.counts["in_progress"] == 1 and not report.problems
    # It goes on a later run, once the grace has passed.
    later = purge(env, REC_UNTIL + DAY, grace=0)
    assert later.counts["recordings_deleted"] == 1
    assert not (env.rec / "live.wav").exists()


def test_a_recording_within_retention_is_never_deleted(env: Env) -> None:
    env.call(file="c1.wav", recording_days=90)
    report = purge(env, REC_UNTIL - 1, grace=0, delete_orphans=True, orphan_grace=0)
    assert (env.rec / "c1.wav").exists()
    assert report.counts["orphans_found"] == 0


def test_a_missing_file_gets_its_row_marked_with_a_warning(env: Env) -> None:
    seq = env.call(file="")
    # Another call's recording, not due: the dir is not an empty (unmounted) one.
    env.call(file="live.wav", decided_at=REC_UNTIL)
    report = purge(env, REC_UNTIL)
    assert env.row(seq)["recording_purged_at"] is not None
    assert report.counts["recordings_missing"] == 1
    assert report.counts["recordings_deleted"] == 0
    assert any(f"seq {seq}" in w and "missing" in w for w in report.warnings)
    again = purge(env, REC_UNTIL)
    assert again.counts["recordings_missing"] == 0 and not again.warnings


def test_a_recording_that_never_started_is_marked_with_a_clear_warning(env: Env) -> None:
    seq = env.call(file="")
    log = env.open_log()
    log.mark_recording("c1", False, "MixMonitor failed", T0)
    log.close()
    report = purge(env, REC_UNTIL)
    assert env.row(seq)["recording_purged_at"] is not None
    assert report.warnings == [f"seq 1: recording {env.rec / 'c1.wav'} is missing (MixMonitor "
                               "never started it); row marked purged"]


def test_orphans_are_reported_and_deleted_only_when_asked_and_old_enough(env: Env) -> None:
    env.call(file="known.wav", decided_at=T0 + 200 * DAY)
    env.write("old-orphan.wav", mtime=T0)
    env.write("young-orphan.wav", mtime=time.time())
    (env.rec / "link-orphan.wav").symlink_to("/etc/hostname")
    report = purge(env, REC_UNTIL)
    assert report.counts["orphans_found"] == 2 and report.counts["orphans_deleted"] == 0
    assert sum("orphan file" in w for w in report.warnings) == 2
    assert {"known.wav", "old-orphan.wav", "young-orphan.wav", "link-orphan.wav"} <= env.files()
    report = purge(env, REC_UNTIL, delete_orphans=True, orphan_grace=DAY)
    assert report.counts["orphans_deleted"] == 1
    assert env.files() == {"known.wav", "young-orphan.wav", "link-orphan.wav"}
    [item] = env.query("SELECT * FROM purge_items WHERE action='orphan_deleted'")
    assert item["path"] == "old-orphan.wav" and item["state"] == "done"


def test_orphans_in_subdirectories_are_found(env: Env) -> None:
    env.call(file="2025/06/known.wav", decided_at=T0 + 200 * DAY)
    env.write("2025/06/orphan.wav")
    report = purge(env, REC_UNTIL, delete_orphans=True, orphan_grace=0)
    assert report.counts["orphans_deleted"] == 1
    assert env.files() == {"2025/06/known.wav"}


# --- crash safety ------------------------------------------------------------------------

_SELF_KILL = textwrap.dedent("""
    import os, signal, sys, time
    from consentivr import recordingsdir
    mode, n = sys.argv[1], int(sys.argv[2])
    real_unlink, count = os.unlink, 0
    def unlink(*args, **kw):
        global count
        real_unlink(*args, **kw)
        count += 1
        if mode == "self" and count == n:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after an unlink
        if mode == "slow":
            time.sleep(0.0005)
    recordingsdir.os.unlink = unlink
    from consentivr.retention import PurgeOptions, run_purge
    from pathlib import Path
    db, rec, as_of = Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
    run_purge(db, rec, PurgeOptions(as_of=as_of, log_retention_days=730, batch_size=500))
""")

N = 10_000


@pytest.fixture
def big(tmp_path: Path) -> Env:
    env = Env(tmp_path)
    records = []
    for n in range(1, N + 1):
        name = f"c{n}.wav"
        env.write(name, b"x")
        records.append(record(n, recording=str(env.rec / name),
                              decided_at=T0 + (n % 7) * 60))
    env.add(*records)
    return env


def _child(env: Env, mode: str, n: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _SELF_KILL, mode, str(n), str(env.db), str(env.rec),
         str(REC_UNTIL + DAY)], stderr=subprocess.PIPE)


def _assert_consistent_after_rerun(env: Env, mid_batch: bool) -> None:
    pending = env.query("SELECT count(*) FROM purge_items WHERE state='pending'")[0][0]
    if mid_batch:
        assert pending > 0, "a kill between unlink and commit leaves its intent behind"
    report = purge(env, REC_UNTIL + DAY)
    assert env.files() == set()
    rows = env.query("SELECT count(*) FROM calls WHERE recording_purged_at IS NULL")
    assert rows[0][0] == 0
    # Counted once: per item, per run and in total, and never as "missing".
    items = env.query("SELECT seq, count(*) FROM purge_items WHERE action='recording_deleted' "
                      "AND state='done' GROUP BY seq HAVING count(*) > 1")
    assert items == []
    total = env.query("SELECT count(DISTINCT seq) FROM purge_items "
                      "WHERE action='recording_deleted' AND state='done'")[0][0]
    assert total == N
    runs = env.query("SELECT status, recordings_deleted, recordings_missing FROM purge_runs "
                     "ORDER BY id")
    assert [r["status"] for r in runs] == ["interrupted", "done"]
    assert sum(r["recordings_deleted"] for r in runs) == N
    assert sum(r["recordings_missing"] for r in runs) == 0
    assert env.query("SELECT count(*) FROM purge_items WHERE state='pending'")[0][0] == 0
    if mid_batch:
        assert report.recovered > 0
    per_run = env.query("SELECT run_id, count(*) AS n FROM purge_items GROUP BY run_id")
    assert {r["run_id"]: r["n"] for r in per_run} == {
        r["id"]: r["recordings_deleted"]
        for r in env.query("SELECT id, recordings_deleted FROM purge_runs")}


def test_kill_9_right_after_an_unlink_then_rerun_is_consistent(big: Env) -> None:
    child = _child(big, "self", 4321)
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert 0 < len(big.files()) < N
    _assert_consistent_after_rerun(big, mid_batch=True)


def test_kill_9_from_outside_part_way_then_rerun_is_consistent(big: Env) -> None:
    child = _child(big, "slow")
    deadline = time.monotonic() + 60
    try:
        # Wait until at least two batches are committed, then kill -9.
        while time.monotonic() < deadline:
            done = big.query("SELECT count(*) FROM purge_items WHERE state='done'")[0][0]
            if done >= 1000:
                break
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.3))  # somewhere in the next batch
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    remaining = len(big.files())
    assert 0 < remaining <= N - 1000
    _assert_consistent_after_rerun(big, mid_batch=False)


# --- the command ---------------------------------------------------------------------


def invoke(env: Env, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(purge_command, ["--config", str(env.config), *args])
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_output_and_exit_0(env: Env) -> None:
    env.call(file="a.wav")
    code, out, _ = invoke(env, "--json", "--as-of", "2025-09-13T15:06:40Z")
    assert code == 0
    data = json.loads(out)
    assert data["counts"]["recordings_deleted"] == 1
    assert data["items"] == [{"action": "recording_deleted", "seq": 1,
                              "path": str(env.rec / "a.wav")}]
    assert data["dry_run"] is False


def test_cli_dry_run_lists_one_line_per_item_even_for_a_newline_name(env: Env) -> None:
    env.call(file="new\nline.wav")
    code, out, _ = invoke(env, "--dry-run", "--as-of", "2025-12-01")
    assert code == 0
    lines = out.splitlines()
    quoted = json.dumps(str(env.rec / "new\nline.wav"))
    assert lines[0] == f"would delete recording: seq 1 {quoted}"
    assert lines[-1].startswith("purge run 1 (dry run, as of 2025-12-01T00:00:00.000000Z)")
    assert (env.rec / "new\nline.wav").exists()


def test_cli_exit_3_when_something_is_left_alone(env: Env, tmp_path: Path) -> None:
    (env.rec / "link.wav").symlink_to(tmp_path / "config.yaml")
    env.add(record(1, recording=str(env.rec / "link.wav")))
    code, _, err = invoke(env, "--as-of", "2026-01-01")
    assert code == 3
    assert "problem: seq 1: recording" in err and "not a regular file" in err
    assert err.strip().splitlines()[-1] == "Error: 1 item(s) left alone; see above"


def test_cli_exit_4_when_another_purge_runs(sqlite_env: Env) -> None:
    env = sqlite_env
    env.call(file="a.wav")
    env.conn().close()
    with purge_lock(env.db):
        code, _, err = invoke(env)
    assert code == 4
    assert err.strip() == f"Error: {env.db}.purge.lock: another purge or erasure is running"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--as-of", "yesterday"], 2, "'yesterday': expected an ISO date"),
    (["--grace", "soon"], 2, "'soon': expected seconds or e.g. 5m"),
    (["--config", "/nonexistent/c.yaml"], 1, "Error: /nonexistent/c.yaml:1:1: file not found"),
])
def test_cli_bad_input_is_one_line(env: Env, args: list[str], code: int, message: str) -> None:
    got, _, err = invoke(env, *args)
    assert got == code
    assert message in err
    assert "Traceback" not in err


def test_cli_unreadable_database_is_one_line(sqlite_env: Env) -> None:
    env = sqlite_env
    env.db.parent.mkdir(parents=True, exist_ok=True)
    env.db.write_bytes(b"this is not sqlite" * 100)
    code, _, err = invoke(env)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and str(env.db) in err


def test_cli_quiet_without_a_terminal(env: Env) -> None:
    env.call(file="a.wav")
    code, out, err = invoke(env, "--as-of", "2026-01-01")
    assert code == 0 and err == ""
    assert out.count("\n") == 1  # the one summary line, no progress bar


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(purge_command, ["--help"])
    assert "Example:" in result.output and "consentivr purge --dry-run" in result.output
    assert "Exit codes" in result.output


def test_bench_smoke_run() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "purge"
    result = subprocess.run([sys.executable, str(bench), "--rows", "1000", "--files", "100",
                             "--rounds", "1"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "recording files:   100 (30 expired)" in result.stdout
    assert "same files left:   yes" in result.stdout
