"""Access (export), erasure and the callback list, on real files in a temp dir."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.audit import verify_chain
from consentivr.callbacks import DoneStatus, call_history, export_runs, mark_done
from consentivr.cli.main import main as cli_main
from consentivr.cli.rights import callbacks_done, callbacks_export, subject_erase, subject_export
from consentivr.errors import ConsentivrError
from consentivr.retention import PurgeOptions
from consentivr.subject import callback_list, export_subject, normalise_number
from tests.rights_fixtures import BACKENDS, DAY, T0, Env, backend_env, record

ALICE = "+31201234567"
BOB = "+31209999999"


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    env = backend_env(request, tmp_path)
    env.call(file="a1.wav", caller=ALICE, content=b"alice one")  # 1
    env.call(caller=ALICE, callback=True, decided_at=T0 + DAY)  # 2
    env.call(file="b1.wav", caller=BOB, content=b"bob one")  # 3
    env.call(caller=BOB, callback=True)  # 4
    return env


def export(env: Env, number: str, out: Path | None) -> dict[str, object]:
    conn = env.conn()
    try:
        return export_subject(conn, env.rec, env.key, number, out).to_json()
    finally:
        conn.close()


def all_text(env: Env) -> str:
    """Everything in the log and purge log, as text, to search for personal data."""
    conn = env.conn()
    try:
        parts = []
        for table in ("calls", "purge_runs", "purge_items"):
            parts += [repr(tuple(r)) for r in conn.execute(f"SELECT * FROM {table}")]
        return "\n".join(parts)
    finally:
        conn.close()


def test_export_erase_export_leaves_nothing_personal(env: Env, tmp_path: Path) -> None:
    first = export(env, ALICE, tmp_path / "request-1")
    rows = first["rows"]
    assert isinstance(rows, list) and [r["call_id"] for r in rows] == ["c1", "c2"]
    assert rows[1]["caller_number"] == ALICE
    assert first["recordings"] == ["recordings/1-a1.wav"]
    assert (tmp_path / "request-1/recordings/1-a1.wav").read_bytes() == b"alice one"
    on_disk = json.loads((tmp_path / "request-1/subject.json").read_text())
    assert on_disk["rows"] == rows
    assert "personal_salt" not in rows[0]
    assert oct((tmp_path / "request-1").stat().st_mode & 0o777) == "0o700"

    alice_hash = env.key.pseudonym(ALICE)
    report = env.erase(ALICE)
    assert report.counts["rows_redacted"] == 2 and report.counts["recordings_deleted"] == 1
    assert not (env.rec / "a1.wav").exists()

    again = export(env, ALICE, tmp_path / "request-2")
    assert again["rows"] == [] and again["recordings"] == []
    assert os.listdir(tmp_path / "request-2/recordings") == []
    text = all_text(env)
    assert ALICE not in text and alice_hash is not None and alice_hash not in text
    # Bob is untouched; the proof rows stay; the chain verifies.
    assert export(env, BOB, None)["rows"] and (env.rec / "b1.wav").exists()
    assert env.row(1)["decisions"] and env.row(1)["redacted_at"]
    conn = env.conn()
    try:
        assert verify_chain(conn).ok
    finally:
        conn.close()


def test_erase_leaves_a_non_personal_tombstone(env: Env) -> None:
    report = env.erase(ALICE)
    [run] = env.query("SELECT * FROM purge_runs WHERE kind='erase'")
    assert run["id"] == report.run_id and run["rows_redacted"] == 2 and run["status"] == "done"
    items = env.query("SELECT seq, action, path FROM purge_items WHERE run_id=? ORDER BY seq, "
                      "action", (run["id"],))
    assert [tuple(i) for i in items] == [(1, "erased", None), (1, "recording_deleted", None),
                                         (2, "erased", None)]


def test_erase_keeps_a_recording_still_being_written(env: Env) -> None:
    live = env.rec / "live.wav"
    env.add(record(9, caller=ALICE, recording=str(live)))
    live.write_bytes(b"being written")  # mtime: now
    report = env.erase(ALICE)
    assert live.exists() and report.problems
    assert env.row(5)["caller_hash"] is not None  # the live call's row is left whole
    assert env.row(1)["caller_hash"] is None


def test_export_does_not_follow_a_symlink(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not the caller's")
    (env.rec / "a1.wav").unlink()
    (env.rec / "a1.wav").symlink_to(secret)
    result = export(env, ALICE, tmp_path / "out")
    assert result["recordings"] == []
    assert result["missing_recordings"] == [str(env.rec / "a1.wav")]
    assert os.listdir(tmp_path / "out/recordings") == []


def test_export_refuses_a_non_empty_dir(env: Env, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ConsentivrError, match="not empty"):
        export(env, ALICE, tmp_path / "out")


@pytest.mark.parametrize(("given", "number"), [
    ("+31 20 123 4567", ALICE), ("+31-20-123.45.67", ALICE), ("(+31) 201234567", ALICE),
    ("alice", "alice"),
])
def test_numbers_are_normalised(given: str, number: str) -> None:
    assert normalise_number(given) == number


@pytest.mark.parametrize("given", ["", " - ", "\x00"])
def test_empty_numbers_are_refused(given: str) -> None:
    with pytest.raises(ConsentivrError, match="expected a phone number"):
        normalise_number(given)


# --- the callback list --------------------------------------------------------------------


def callbacks(env: Env, as_of: float) -> list[dict[str, object]]:
    conn = env.conn()
    try:
        from consentivr.configfile import load_settings

        return callback_list(conn, load_settings(env.config).flows, as_of)
    finally:
        conn.close()


def test_callback_list_holds_yes_callers_within_retention_only(env: Env) -> None:
    assert [c["number"] for c in callbacks(env, T0 + DAY)] == [BOB, ALICE]
    # Bob's callback ends 30 days after T0, to the second; Alice's a day later.
    assert [c["number"] for c in callbacks(env, T0 + 30 * DAY - 1)] == [BOB, ALICE]
    assert [c["number"] for c in callbacks(env, T0 + 30 * DAY)] == [ALICE]
    assert callbacks(env, T0 + 31 * DAY) == []


def test_a_later_no_takes_the_number_off_the_list(env: Env) -> None:
    env.add(record(20, caller=BOB, callback=False, decided_at=T0 + 2 * DAY))
    assert [c["number"] for c in callbacks(env, T0 + 3 * DAY)] == [ALICE]


def test_a_later_yes_keeps_one_line_per_number(env: Env) -> None:
    env.add(record(20, caller=BOB, callback=True, decided_at=T0 + 2 * DAY))
    listed = callbacks(env, T0 + 3 * DAY)
    assert [(c["number"], c["call_id"]) for c in listed] == [(ALICE, "c2"), (BOB, "c20")]


def test_erased_and_purged_callers_are_off_the_list(env: Env) -> None:
    env.erase(BOB)
    assert [c["number"] for c in callbacks(env, T0 + DAY)] == [ALICE]
    env.purge(PurgeOptions(as_of=T0 + 31 * DAY, log_retention_days=730))
    assert env.query("SELECT count(*) FROM calls WHERE caller_number IS NOT NULL")[0][0] == 0


# --- the commands --------------------------------------------------------------------------


def run(command: object, env: Env, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(command, ["--config", str(env.config), *args],  # type: ignore[arg-type]
                                input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_cli_callbacks_csv_and_json(env: Env) -> None:
    code, out, _ = run(callbacks_export, env, "--by", "ops", "--as-of", "2025-06-20")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    # A leading + is a formula to a spreadsheet: neutralised with ' (OWASP).
    assert [r["number"] for r in rows] == [f"'{BOB}", f"'{ALICE}"]
    assert set(rows[0]) == {"number", "call_id", "flow", "language", "decided_at",
                            "callback_until"}
    code, out, _ = run(callbacks_export, env, "--by", "ops", "--format", "json",
                       "--as-of", "2025-06-20")
    assert code == 0 and [r["number"] for r in json.loads(out)] == [BOB, ALICE]


def test_cli_export_prints_json_without_out(env: Env) -> None:
    code, out, _ = run(subject_export, env, "--caller", "+31 20 123 4567")
    assert code == 0
    assert [r["call_id"] for r in json.loads(out)["rows"]] == ["c1", "c2"]


def test_cli_export_to_a_dir(env: Env, tmp_path: Path) -> None:
    code, out, _ = run(subject_export, env, "--caller", ALICE, "--out", str(tmp_path / "o"))
    assert code == 0
    assert out.strip() == f"wrote 2 row(s) and 1 recording(s) to {tmp_path / 'o'}"


def test_cli_erase_asks_first(env: Env) -> None:
    code, _, err = run(subject_erase, env, "--caller", ALICE, stdin="n\n")
    assert code == 1 and "Erase 2 log row(s) and 1 recording(s)" in err
    assert (env.rec / "a1.wav").exists() and env.row(1)["caller_hash"] is not None
    code, out, _ = run(subject_erase, env, "--caller", ALICE, stdin="y\n")
    assert code == 0
    assert out.strip().endswith("erased 2 row(s), deleted 1 recording(s) (0 already missing)")
    assert not (env.rec / "a1.wav").exists()


def test_cli_erase_yes_json_and_nothing_left(env: Env) -> None:
    code, out, _ = run(subject_erase, env, "--caller", ALICE, "--yes", "--json")
    assert code == 0 and json.loads(out)["counts"]["rows_redacted"] == 2
    code, out, _ = run(subject_erase, env, "--caller", ALICE, "--yes")
    assert code == 0 and out.strip() == "nothing held about this number"


def test_cli_refuses_a_key_file_readable_by_others(env: Env, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o644)
    text = env.config.read_text().replace("caller_key: k", f"caller_key_file: {key}")
    env.config.write_text(text)
    code, _, err = run(subject_export, env, "--caller", ALICE)
    assert code == 1
    assert err.strip().endswith(f"caller_key_file: {key} is readable by others: chmod 600 it")


# --- the survey team's side (issue 18): accountable exports, callbacks done ----------------


def done(env: Env, *call_ids: str, by: str = "J. de Vries") -> list[DoneStatus]:
    conn = env.conn()
    try:
        return [r.status for r in mark_done(conn, call_ids, by, T0 + 2 * DAY)]
    finally:
        conn.close()


def chain_ok(env: Env) -> bool:
    conn = env.conn()
    try:
        return verify_chain(conn).ok
    finally:
        conn.close()


# (ids given, what each gets, the numbers left on the list)
DONE_CASES = [
    (("c4",), [DoneStatus.CLEARED], [ALICE]),
    (("c2", "c4"), [DoneStatus.CLEARED, DoneStatus.CLEARED], []),
    (("c4", "c4"), [DoneStatus.CLEARED, DoneStatus.ALREADY_CLEARED], [ALICE]),
    (("nope", "c4"), [DoneStatus.UNKNOWN, DoneStatus.CLEARED], [ALICE]),
    (("c1",), [DoneStatus.NOT_A_CALLBACK], [BOB, ALICE]),  # said no: no number held
]


@pytest.mark.parametrize(("ids", "statuses", "left"), DONE_CASES)
def test_callbacks_done_clears_the_number_at_once(env: Env, ids: tuple[str, ...],
                                                  statuses: list[DoneStatus],
                                                  left: list[str]) -> None:
    assert done(env, *ids) == statuses
    assert [c["number"] for c in callbacks(env, T0 + 3 * DAY)] == left
    assert chain_ok(env)  # cleared the way purge clears: the chain still verifies


def test_callbacks_done_also_clears_earlier_yes_calls_of_that_number(env: Env) -> None:
    env.add(record(20, caller=BOB, callback=True, decided_at=T0 + DAY))
    assert [c["call_id"] for c in callbacks(env, T0 + 3 * DAY)] == ["c2", "c20"]
    assert done(env, "c20") == [DoneStatus.CLEARED]
    # The earlier yes (c4) must not bring Bob back on the list.
    assert [c["number"] for c in callbacks(env, T0 + 3 * DAY)] == [ALICE]
    assert BOB not in all_text(env)
    assert env.row(4)["caller_hash"] is not None  # only the clear number goes
    assert env.row(4)["personal_salt"] is None  # and the salt, as purge does
    conn = env.conn()
    try:
        [entry] = call_history(conn, "c4")["done"]
        assert (entry["done_by"], entry["marked_call_id"]) == ("J. de Vries", "c20")
    finally:
        conn.close()
    assert chain_ok(env)


def test_an_earlier_done_is_reported_with_who_and_when(env: Env) -> None:
    done(env, "c4", by="Anna")
    conn = env.conn()
    try:
        [again] = mark_done(conn, ["c4"], "Bert", T0 + 5 * DAY)
    finally:
        conn.close()
    assert (again.status, again.done_by) == (DoneStatus.ALREADY_CLEARED, "Anna")
    [row] = env.query("SELECT call_id, marked_call_id, done_by FROM callback_done")
    assert tuple(row) == ("c4", "c4", "Anna")


@pytest.mark.parametrize("by", ["", "   ", "a\x00b", "x" * 101])
def test_done_needs_a_name(env: Env, by: str) -> None:
    with pytest.raises(ConsentivrError, match="--by"):
        done(env, "c4", by=by)
    assert [c["number"] for c in callbacks(env, T0 + DAY)] == [BOB, ALICE]


def test_cli_done_reports_unknown_ids_and_goes_on(env: Env) -> None:
    code, out, err = run(callbacks_done, env, "--by", "Anna", "c4", "nope", "c1")
    assert code == 3
    assert out.splitlines() == ["c4: cleared (1 row(s) held the number)"]
    assert "nope: unknown call id" in err and "c1: no callback asked" in err
    assert "2 of 3 id(s) not cleared" in err
    code, out, _ = run(callbacks_done, env, "--by", "Anna", "c4")
    assert code == 0 and out.startswith("c4: already cleared (by Anna at ")
    code, _, err = run(callbacks_done, env, "--by", "Anna")
    assert code == 2 and "give CALL_ID... or --from-file" in err


def test_cli_done_reads_the_export_csv(env: Env, tmp_path: Path) -> None:
    code, out, _ = run(callbacks_export, env, "--by", "Anna", "--as-of", "2025-06-20")
    assert code == 0
    (tmp_path / "called.csv").write_text(out)
    code, out, _ = run(callbacks_done, env, "--by", "Anna", "--from-file",
                       str(tmp_path / "called.csv"), "--json")
    assert code == 0
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["cleared"] * 2
    code, out, _ = run(callbacks_export, env, "--by", "Anna", "--as-of", "2025-06-20")
    assert list(csv.DictReader(io.StringIO(out))) == []


def test_cli_done_reads_ids_from_stdin(env: Env) -> None:
    code, out, _ = run(callbacks_done, env, "--by", "Anna", "--from-file", "-",
                       stdin="# called today\nc4\n\n")
    assert code == 0 and out.startswith("c4: cleared")


def test_each_export_run_is_recorded_without_the_numbers(env: Env) -> None:
    run(callbacks_export, env, "--by", "Anna", "--as-of", "2025-06-20")
    done(env, "c4")
    run(callbacks_export, env, "--by", "Bert", "--format", "json", "--as-of", "2025-06-20")
    conn = env.conn()
    try:
        runs = export_runs(conn)
        assert [(r["exported_by"], r["entries"]) for r in runs] == [("Anna", 2), ("Bert", 1)]
        history = call_history(conn, "c2")
        assert [e["exported_by"] for e in history["exports"]] == ["Anna", "Bert"]
        assert [e["exported_by"] for e in call_history(conn, "c4")["exports"]] == ["Anna"]
        audit = [repr(tuple(r)) for t in ("callback_exports", "callback_export_calls",
                                          "callback_done")
                 for r in conn.execute(f"SELECT * FROM {t}")]
    finally:
        conn.close()
    text = "\n".join(audit)
    assert ALICE not in text and BOB not in text


def test_cli_export_needs_by(env: Env) -> None:
    code, _, err = run(callbacks_export, env)
    assert code == 2 and "--by" in err


def test_calls_show_shows_the_survey_teams_side(env: Env) -> None:
    run(callbacks_export, env, "--by", "Anna", "--as-of", "2025-06-20")
    done(env, "c4", by="Bert")
    result = CliRunner().invoke(cli_main, ["calls", "show", "--config", str(env.config), "c4"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["caller_number"] is None
    assert [e["exported_by"] for e in shown["callbacks"]["exports"]] == ["Anna"]
    assert [(d["done_by"], d["marked_call_id"]) for d in shown["callbacks"]["done"]] == [
        ("Bert", "c4")]
