"""`consentivr verify`: the hash chain catches edits, deletions and swaps, and
still verifies after purge and erasure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consentivr.audit import ChainReport, verify_chain
from consentivr.cli.rights import verify_command
from consentivr.retention import PurgeOptions
from consentivr.store import PERSONAL_FIELDS, PROOF_FIELDS
from tests.rights_fixtures import BACKENDS, DAY, T0, Env, backend_env, record


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    env = backend_env(request, tmp_path)
    for n in range(1, 11):
        env.call(file=f"c{n}.wav", callback=n % 3 == 0, decided_at=T0 + n * DAY,
                 caller=f"+3120000000{n % 4}")
    return env


def check(env: Env) -> ChainReport:
    conn = env.conn()
    try:
        return verify_chain(conn)
    finally:
        conn.close()


def tamper(env: Env, sql: str, params: tuple[object, ...] = ()) -> None:
    env.tamper(sql, params)


def test_an_untouched_log_verifies(env: Env) -> None:
    report = check(env)
    assert report.ok and report.rows == 10 and report.head_seq == 10
    assert report.head_hash == env.row(10)["row_hash"]


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.conn().close()
    assert check(env) == ChainReport(rows=0, head_seq=None, head_hash=None, redacted=0)


@pytest.mark.parametrize(("sql", "bad", "words"), [
    ("UPDATE calls SET decisions='{\"callback\":\"no\",\"recording\":\"yes\"}' WHERE seq=4",
     4, "row_hash does not match"),
    ("UPDATE calls SET decided_at='2020-01-01T00:00:00.000000Z' WHERE seq=5", 5, "row_hash"),
    ("UPDATE calls SET notice_version='nv2' WHERE seq=1", 1, "row_hash"),
    ("UPDATE calls SET caller_hash='0000' WHERE seq=6", 6, "personal fields"),
    ("UPDATE calls SET recording_path=NULL WHERE seq=7", 7, "personal fields"),
    ("UPDATE calls SET personal_salt=NULL WHERE seq=2", 2, "salt was removed"),
    ("DELETE FROM calls WHERE seq=3", 4, "rows are missing before it"),
    ("DELETE FROM calls WHERE seq=1", 2, "rows are missing before it"),
    # Always a different first digit (a bare 'f' would change nothing 1 time in 16).
    ("UPDATE calls SET row_hash=CASE WHEN substr(row_hash, 1, 1)='f' THEN 'e' ELSE 'f' END "
     "|| substr(row_hash, 2) WHERE seq=8", 8, "row_hash"),
])
def test_verify_names_the_first_bad_row(env: Env, sql: str, bad: int, words: str) -> None:
    tamper(env, sql)
    report = check(env)
    assert not report.ok
    assert report.bad_seq == bad and words in (report.problem or "")


def test_verify_catches_two_swapped_rows(env: Env) -> None:
    # Swap rows 4 and 6 wholesale, including their seq.
    tamper(env, "UPDATE calls SET seq=-4 WHERE seq=4")
    tamper(env, "UPDATE calls SET seq=4 WHERE seq=6")
    tamper(env, "UPDATE calls SET seq=6 WHERE seq=-4")
    report = check(env)
    assert (report.bad_seq, report.bad_call_id) == (4, "c6")
    assert "prev_hash" in (report.problem or "")


def test_verify_catches_swapped_contents(env: Env) -> None:
    # Rows 4 and 6 trade every column but seq, hashes included.
    a, b = dict(env.row(4)), dict(env.row(6))
    tamper(env, "UPDATE calls SET call_id='tmp' WHERE seq=4")
    for target, source in ((6, a), (4, b)):
        cols = [c for c in source if c != "seq"]
        tamper(env, f"UPDATE calls SET {', '.join(f'{c}=?' for c in cols)} WHERE seq=?",
               (*(source[c] for c in cols), target))
    report = check(env)
    assert report.bad_seq == 4 and report.bad_call_id == "c6"


def test_verify_catches_deleted_last_rows_once_a_purge_saw_them(env: Env) -> None:
    env.purge(PurgeOptions(as_of=T0, log_retention_days=730))
    tamper(env, "DELETE FROM calls WHERE seq=10")
    report = check(env)
    assert report.bad_seq == 10 and "deleted" in (report.problem or "")


# The anchor check is shared by verify (audit) and the report's parallel check
# (verifier): both must give the same report, word for word.
@pytest.mark.parametrize(("sql", "problem"), [
    ("DELETE FROM calls WHERE seq=10",
     "purge run 1 saw rows up to seq 10: rows at the end of the log were deleted"),
    ("UPDATE purge_runs SET head_hash='ab' WHERE head_seq IS NOT NULL",
     "row seq 10 differs from what purge run 1 saw: the chain was rewritten"),
])
def test_a_broken_anchor_reads_the_same_in_both_checks(tmp_path: Path, sql: str,
                                                        problem: str) -> None:
    from consentivr.verifier import verify_log

    env = Env(tmp_path)
    for n in range(1, 11):
        env.call(file=f"c{n}.wav", decided_at=T0 + n * DAY)
    env.purge(PurgeOptions(as_of=T0, log_retention_days=730))
    head = {seq: env.row(seq)["row_hash"] for seq in (9, 10)}
    tamper(env, sql)
    rows = 9 if sql.startswith("DELETE") else 10
    want = ChainReport(rows=rows, head_seq=rows, head_hash=head[rows], redacted=0,
                       bad_seq=10, problem=problem)
    assert check(env) == want
    assert verify_log(env.db, workers=1) == want


def test_verify_passes_after_purge_and_erase(env: Env) -> None:
    # Recordings, callback numbers and some rows' personal data all go.
    report = env.purge(PurgeOptions(as_of=T0 + 735 * DAY,
                                                     log_retention_days=730))
    assert report.counts["rows_redacted"] == 5 and report.counts["recordings_deleted"] == 10
    assert report.counts["callers_cleared"] == 2
    erased = env.erase("+31200000002")  # rows 2, 6 and 10
    assert erased.counts["rows_redacted"] == 2  # row 2 was redacted by the purge
    result = check(env)
    assert result.ok, result.problem
    assert result.rows == 10 and result.redacted == 7


def test_a_redacted_row_that_regains_personal_data_is_caught(env: Env) -> None:
    env.purge(PurgeOptions(as_of=T0 + 732 * DAY, log_retention_days=730))
    tamper(env, "UPDATE calls SET caller_hash='abc' WHERE seq=1")
    report = check(env)
    assert report.bad_seq == 1 and "holds personal fields again" in (report.problem or "")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.integers(1, 10),
       column=st.sampled_from([f for f in (*PROOF_FIELDS, *PERSONAL_FIELDS) if f != "seq"]),
       value=st.one_of(st.text(max_size=8), st.none()))
def test_any_edit_of_any_field_is_caught_at_that_row(tmp_path_factory: pytest.TempPathFactory,
                                                     seq: int, column: str,
                                                     value: str | None) -> None:
    env = Env(tmp_path_factory.mktemp("chain"))
    for n in range(1, 11):
        env.add(record(n, callback=n % 2 == 0, decided_at=T0 + n))
    old = env.row(seq)[column]
    if old == value or (column in {"call_id", "flow", "language", "notice_version",
                                   "started_at", "decided_at", "decisions",
                                   "retention_until", "outcome"} and value is None):
        return  # no change, or one the NOT NULL schema refuses anyway
    tamper(env, f"UPDATE calls SET {column}=? WHERE seq=?", (value, seq))
    assert check(env).bad_seq == seq


def test_cli_verify_ok_and_broken(env: Env) -> None:
    ok = CliRunner().invoke(verify_command, ["--config", str(env.config)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok: 10 row(s), 0 redacted; head seq 10 hash ")
    tamper(env, "UPDATE calls SET outcome='abandoned' WHERE seq=3")
    bad = CliRunner().invoke(verify_command, ["--config", str(env.config)])
    assert bad.exit_code == 3
    assert bad.stderr.strip() == ("Error: chain broken at row seq 3 (call c3): row_hash does "
                                  "not match the row: the row was edited")
    as_json = CliRunner().invoke(verify_command, ["--config", str(env.config), "--json"])
    assert as_json.exit_code == 3
    assert json.loads(as_json.stdout)["bad_seq"] == 3


def test_cli_verify_without_a_log_is_one_line(tmp_path: Path) -> None:
    env = Env(tmp_path)
    result = CliRunner().invoke(verify_command, ["--config", str(env.config)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {env.db}: no consent log here"


def test_cli_verify_does_not_write(tmp_path: Path) -> None:
    env = Env(tmp_path)  # the SQLite file: read-only, and unchanged byte for byte
    for n in range(1, 4):
        env.call(file=f"c{n}.wav")
    env.db.chmod(0o400)
    before = env.db.read_bytes()
    result = CliRunner().invoke(verify_command, ["--config", str(env.config)])
    assert result.exit_code == 0, result.output
    assert env.db.read_bytes() == before
