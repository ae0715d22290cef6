"""The consent log on both backends (SQLite, a real PostgreSQL): the same rows, the
same chain, the same verify; and what only a shared log has: schema versions, one
chain from two nodes writing at once, a server restart under load."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from consentivr.audit import verify_chain
from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.consentlog import ConsentLogBackend, open_consent_log, open_reader
from consentivr.errors import StoreError
from consentivr.pgstore import POSTGRES, Schema
from consentivr.store import CallerKey, ConsentLog, GroupCommitter
from consentivr.withdrawal import RecordingLog
from tests.pg_fixtures import PgServer
from tests.rights_fixtures import CONFIG, DAY, KEY, T0, record

PGPASS_ENV = "CONSENTIVR_TEST_PGPASS"


@dataclass
class Backend:
    """One consent log on one backend, and its config for the CLI."""

    kind: str
    config: Path
    settings_for: Callable[[str], Any]

    def open(self, node: str = "n1") -> ConsentLogBackend:
        return open_consent_log(self.settings_for(node))

    def reader(self) -> Any:
        return open_reader(self.settings_for("n1"))

    def tamper(self, sql: str, params: tuple[object, ...] = ()) -> None:
        settings = self.settings_for("n1")
        # The reader is read-only on SQLite: an attacker's own connection instead.
        conn = (sqlite3.connect(settings.database) if settings.database_url is None
                else self.reader())
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()

    def verify(self) -> Any:
        conn = self.reader()
        try:
            return verify_chain(conn)
        finally:
            conn.close()

    def add(self, *ns: int, node: str = "n1") -> None:
        log = self.open(node)
        try:
            log.append_many([record(n, decided_at=T0 + n * DAY) for n in ns])
        finally:
            log.close()


def _write_config(root: Path, database: str, node: str, extra: str = "") -> Path:
    rec = root / f"recordings-{node}"  # each node has its own disk
    rec.mkdir(exist_ok=True)
    path = root / f"config-{node}.yaml"
    path.write_text(CONFIG.format(db=database, rec=rec, log_days=730)
                    + f"node: {node}\n" + extra)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Backend:
    if request.param == "sqlite":
        database, extra = str(tmp_path / "var" / "consent.db"), ""
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        database, extra = server.new_database(), f"database_password_env: {PGPASS_ENV}\n"
        monkeypatch.setenv(PGPASS_ENV, server.password)
    configs: dict[str, Path] = {}

    def settings_for(node: str) -> Any:
        if node not in configs:
            configs[node] = _write_config(tmp_path, database, node, extra)
        return load_settings(configs[node], secrets=())

    settings_for("n1")
    return Backend(request.param, configs["n1"], settings_for)


@pytest.fixture
def pg(pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setenv(PGPASS_ENV, pg_server.password)
    database = pg_server.new_database()
    configs: dict[str, Path] = {}

    def settings_for(node: str) -> Any:
        if node not in configs:
            configs[node] = _write_config(tmp_path, database, node,
                                          f"database_password_env: {PGPASS_ENV}\n")
        return load_settings(configs[node], secrets=())

    settings_for("n1")
    return Backend("postgres", configs["n1"], settings_for)


# --- both backends ------------------------------------------------------------------


def test_rows_read_back_the_same_on_both_backends(backend: Backend) -> None:
    backend.add(1, 2, 3)
    log = backend.open()
    try:
        rows = list(log.calls(newest_first=False))
        assert [r["call_id"] for r in rows] == ["c1", "c2", "c3"]
        assert [r["seq"] for r in rows] == [1, 2, 3]
        assert rows[0]["decisions"] == {"callback": "no", "recording": "no"}
        assert "personal_salt" not in rows[0]
        assert [r["call_id"] for r in log.calls_of("+31 20 123 4567")] == ["c3", "c2", "c1"]
        found = log.call("c2")
        assert found is not None and found["uniqueid"] == "1750000000.2"
        log.mark_recording("c2", True, None, T0)
        log.void_late_consent("c3", "late", T0)
        assert log.call("c2")["recording_confirmed"] == 1  # type: ignore[index]
        assert log.call("c3")["withdrawn_by"] == "system"  # type: ignore[index]
    finally:
        log.close()
    assert backend.verify().ok


def test_a_duplicate_append_says_unique_on_both_backends(backend: Backend) -> None:
    # The late-write log drops a retry whose row did land: it looks for "UNIQUE".
    backend.add(1)
    with pytest.raises(StoreError, match="UNIQUE"):
        backend.add(1)
    assert backend.verify().rows == 1


@pytest.mark.parametrize(("sql", "bad", "words"), [
    ("UPDATE calls SET decisions='{\"callback\":\"no\",\"recording\":\"yes\"}' WHERE seq=4",
     4, "row_hash does not match"),
    ("UPDATE calls SET caller_hash='0000' WHERE seq=6", 6, "personal fields"),
    ("UPDATE calls SET personal_salt=NULL WHERE seq=2", 2, "salt was removed"),
    ("DELETE FROM calls WHERE seq=3", 4, "rows are missing before it"),
    # Always a different first digit (a bare 'f' would change nothing 1 time in 16).
    ("UPDATE calls SET row_hash=CASE WHEN substr(row_hash, 1, 1)='f' THEN 'e' ELSE 'f' END "
     "|| substr(row_hash, 2) WHERE seq=8", 8, "row_hash"),
])
def test_verify_names_the_first_bad_row_on_both_backends(backend: Backend, sql: str, bad: int,
                                                        words: str) -> None:
    backend.add(*range(1, 11))
    backend.tamper(sql)
    report = backend.verify()
    assert not report.ok and report.bad_seq == bad and words in (report.problem or "")


def test_verify_catches_reordered_rows_on_both_backends(backend: Backend) -> None:
    backend.add(*range(1, 8))
    backend.tamper("UPDATE calls SET seq=-4 WHERE seq=4")
    backend.tamper("UPDATE calls SET seq=4 WHERE seq=6")
    backend.tamper("UPDATE calls SET seq=6 WHERE seq=-4")
    report = backend.verify()
    assert (report.bad_seq, report.bad_call_id) == (4, "c6")


def test_cli_verify_and_calls_on_both_backends(backend: Backend) -> None:
    backend.add(1, 2, 3)
    ok = CliRunner().invoke(main, ["verify", "--config", str(backend.config)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok: 3 row(s), 0 redacted; head seq 3 hash ")
    listed = CliRunner().invoke(main, ["calls", "list", "--json", "--config",
                                       str(backend.config)])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["call_id"] for line in listed.stdout.splitlines()] == \
        ["c3", "c2", "c1"]
    backend.tamper("UPDATE calls SET outcome='abandoned' WHERE seq=2")
    bad = CliRunner().invoke(main, ["verify", "--config", str(backend.config)])
    assert bad.exit_code == 3
    assert "chain broken at row seq 2 (call c2)" in bad.stderr


def test_group_commit_batches_and_chains_on_both_backends(backend: Backend) -> None:
    settings = backend.settings_for("n1")
    committer = GroupCommitter(lambda: open_consent_log(settings))
    try:
        futures: list[Future[None]] = [committer.submit("append", record(n))
                                       for n in range(1, 201)]
        futures += [committer.submit("mark_recording", (f"c{n}", True, None, T0))
                    for n in range(1, 201, 7)]
        for f in futures:
            f.result(timeout=30)
        dup = committer.submit("append", record(5))
        with pytest.raises(StoreError, match="UNIQUE"):
            dup.result(timeout=30)
    finally:
        committer.close()
    report = backend.verify()
    assert report.ok and report.rows == 200


def test_recording_log_marks_withdrawals_on_both_backends(backend: Backend) -> None:
    backend.add(1, 2)
    log = RecordingLog.for_settings(backend.settings_for("n1"))
    try:
        assert log.find("1750000000.2")["call_id"] == "c2"  # type: ignore[index]
        assert log.withdraw("c2", T0 + 3 * DAY, "agent", recorded=False)
        assert not log.withdraw("c2", T0 + 4 * DAY, "agent", recorded=False)
    finally:
        log.close()
    rows = {r["call_id"]: r for r in backend.open().calls()}
    assert rows["c2"]["withdrawn_by"] == "agent" and rows["c1"]["withdrawn_at"] is None
    assert backend.verify().ok


# --- PostgreSQL only ----------------------------------------------------------------


@pytest.mark.postgres
def test_two_nodes_writing_at_once_never_fork_the_chain(pg: Backend) -> None:
    """Two nodes' committers (each its own session, like two hosts) append 600 rows at
    once; the one chain has no gap and no fork, every row names its node, and an
    edit on either node's rows is found at that row."""
    committers = {node: GroupCommitter(lambda n=node: open_consent_log(pg.settings_for(n)))
                  for node in ("n1", "n2")}
    go = threading.Event()
    errors: list[BaseException] = []

    def node_writes(node: str, base: int) -> None:
        go.wait()
        futures = [committers[node].submit("append", record(base + i)) for i in range(300)]
        for f in futures:
            try:
                f.result(timeout=60)
            except BaseException as exc:  # reported below
                errors.append(exc)

    threads = [threading.Thread(target=node_writes, args=(n, b))
               for n, b in (("n1", 1000), ("n2", 5000))]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(timeout=120)
    for c in committers.values():
        c.close()
    assert errors == []
    report = pg.verify()
    assert report.ok and report.rows == 600 and report.head_seq == 600
    conn = pg.reader()
    try:
        nodes = {r[0]: r[1] for r in
                 conn.execute("SELECT node, count(*) FROM calls GROUP BY node").fetchall()}
        prevs = conn.execute("SELECT count(DISTINCT prev_hash) FROM calls").fetchone()[0]
        interleaved = conn.execute(
            "SELECT count(*) FROM calls a JOIN calls b ON b.seq = a.seq + 1 "
            "WHERE a.node <> b.node").fetchone()[0]
    finally:
        conn.close()
    assert nodes == {"n1": 300, "n2": 300}
    assert prevs == 600  # no two rows share a predecessor: no fork
    assert interleaved >= 1  # the two nodes' batches really did meet in the chain
    # The node is bound into the hash: moving a row to the other node is an edit.
    pg.tamper("UPDATE calls SET node = CASE node WHEN 'n1' THEN 'n2' ELSE 'n1' END "
              "WHERE seq = 321")
    report = pg.verify()
    assert report.bad_seq == 321 and "row_hash" in (report.problem or "")


@pytest.mark.postgres
def test_an_older_schema_is_refused_until_db_upgrade(pg: Backend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pg.add(1)  # creates the schema at the current version
    newer = Schema(POSTGRES.backend, {**POSTGRES.steps, POSTGRES.current + 1: (
        "ALTER TABLE calls ADD COLUMN site TEXT",)}, POSTGRES.param)
    monkeypatch.setattr("consentivr.pgstore.POSTGRES", newer)
    v = POSTGRES.current
    with pytest.raises(StoreError) as info:
        pg.open()
    assert str(info.value).endswith(
        f"the consent log has schema version {v}, this consentivr needs {v + 1}: "
        "run `consentivr db upgrade`")
    assert "\n" not in str(info.value)
    status = CliRunner().invoke(main, ["db", "status", "--config", str(pg.config)])
    assert status.exit_code == 1 and "run `consentivr db upgrade`" in status.stderr
    up = CliRunner().invoke(main, ["db", "upgrade", "--config", str(pg.config)])
    assert up.exit_code == 0, up.output
    assert f"schema version {v + 1} (applied version(s) {v + 1})" in up.stdout
    pg.open().close()
    again = CliRunner().invoke(main, ["db", "status", "--json", "--config", str(pg.config)])
    assert json.loads(again.stdout)["version"] == v + 1
    assert pg.verify().ok


@pytest.mark.postgres
def test_a_newer_schema_is_refused(pg: Backend) -> None:
    pg.add(1)
    pg.tamper("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=r"schema version 99, newer than this consentivr"):
        pg.open()


def test_sqlite_db_status_and_an_unversioned_log(tmp_path: Path) -> None:
    config = _write_config(tmp_path, str(tmp_path / "var" / "consent.db"), "n1")
    status = CliRunner().invoke(main, ["db", "status", "--config", str(config)])
    assert status.exit_code == 0 and "no consent log yet" in status.stdout
    up = CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)])
    assert up.exit_code == 0 and "schema version 1 (already current)" in up.stdout
    # A log from before versioning (no meta row) is version 1, the only schema it had.
    conn = sqlite3.connect(tmp_path / "var" / "consent.db")
    with conn:
        conn.execute("DELETE FROM meta")
    conn.close()
    ConsentLog(tmp_path / "var" / "consent.db", CallerKey(KEY)).close()
    with conn_of(tmp_path / "var" / "consent.db") as c:
        assert c.execute("SELECT value FROM meta").fetchone()[0] == "1"
    with conn_of(tmp_path / "var" / "consent.db") as c:
        c.execute("UPDATE meta SET value='7'")
    with pytest.raises(StoreError, match="schema version 7, newer than this consentivr"):
        ConsentLog(tmp_path / "var" / "consent.db", CallerKey(KEY))


class conn_of:  # a context manager used as a function
    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.commit()
        self.conn.close()


@pytest.mark.postgres
def test_server_restart_fails_writes_closed_then_reconnects(pg: Backend,
                                                            pg_server: PgServer) -> None:
    """pg_ctl stop -m fast under a writing committer: every write either committed
    (and is in the log) or failed with StoreError (the call goes on unrecorded);
    none is lost or doubled, and writes work again once the server is back."""
    if not pg_server.own:
        pytest.skip("CONSENTIVR_TEST_POSTGRES_URL: not our server to restart")
    settings = pg.settings_for("n1")
    committer = GroupCommitter(lambda: open_consent_log(settings))
    outcomes: dict[str, str] = {}
    try:
        for n in range(1, 51):
            committer.submit("append", record(n)).result(timeout=10)
            outcomes[f"c{n}"] = "ok"
        pg_server.stop()
        for n in range(51, 61):
            try:
                committer.submit("append", record(n)).result(timeout=10)
                outcomes[f"c{n}"] = "ok"
            except StoreError as exc:
                assert "\n" not in str(exc)
                outcomes[f"c{n}"] = "failed"
        pg_server.start()
        for n in range(61, 81):
            committer.submit("append", record(n)).result(timeout=15)
            outcomes[f"c{n}"] = "ok"
    finally:
        if not _running(pg_server):
            pg_server.start()
        committer.close()
    failed = {c for c, o in outcomes.items() if o == "failed"}
    assert failed == {f"c{n}" for n in range(51, 61)}  # fail closed while down
    conn = pg.reader()
    try:
        logged = [r["call_id"] for r in conn.execute("SELECT call_id FROM calls ORDER BY seq")]
    finally:
        conn.close()
    assert len(logged) == len(set(logged))  # no duplicates
    assert set(logged) == {c for c, o in outcomes.items() if o == "ok"}  # none lost
    assert pg.verify().ok


def _running(server: PgServer) -> bool:
    assert server.datadir is not None
    return (server.datadir / "postmaster.pid").exists()


@pytest.mark.postgres
def test_an_unreachable_server_fails_fast_in_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.pg_fixtures import _free_port

    monkeypatch.setenv(PGPASS_ENV, "x")
    config = _write_config(tmp_path, f"postgresql://u@127.0.0.1:{_free_port()}/db", "n1",
                           f"database_password_env: {PGPASS_ENV}\n")
    with pytest.raises(StoreError) as info:
        open_consent_log(load_settings(config, secrets=()))
    assert "cannot connect to the consent log" in str(info.value)
    assert "\n" not in str(info.value) and "x@" not in str(info.value)


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize(("database", "extra", "problem"), [
    ("postgresql://u:pw@h/db", "database_password_env: X\n", "no password in the URL"),
    ("postgresql://u@h:5432", "database_password_env: X\n", "name the database"),
    ("postgresql://u@h:99999/db", "", "not a PostgreSQL URL"),
    ("/var/lib/consentivr/consent.db", "database_password_env: X\n",
     "only for a PostgreSQL database"),
    ("/var/lib/consentivr/consent.db", "node: 'a b'\n", "a node name is"),
])
def test_config_problems_of_a_shared_log(tmp_path: Path, database: str, extra: str,
                                         problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from consentivr.errors import ConfigError

    monkeypatch.setenv("X", "pw")
    path = tmp_path / "c.yaml"
    rec = tmp_path / "rec"
    path.write_text(CONFIG.format(db=database, rec=rec, log_days=730) + extra)
    with pytest.raises(ConfigError) as info:
        load_settings(path, secrets=())
    assert problem in str(info.value)


def test_a_shared_log_needs_a_configured_caller_key(tmp_path: Path) -> None:
    from consentivr.errors import ConfigError

    path = tmp_path / "c.yaml"
    text = CONFIG.format(db="postgresql://u@h/db", rec=tmp_path / "rec", log_days=730)
    path.write_text(text.replace("caller_key: k\n", ""))
    with pytest.raises(ConfigError, match="every node must pseudonymise callers"):
        load_settings(path, secrets=())


def test_a_shared_log_config_reads_password_and_node(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    path = _write_config(tmp_path, "postgresql://consentivr@db1:5432/consent", "pbx-a",
                         f"database_password_file: {secret}\n")
    s = load_settings(path, secrets=())
    assert (s.database_url, s.database_password, s.node) == (
        "postgresql://consentivr@db1:5432/consent", "s3cret", "pbx-a")
    assert "s3cret" not in repr(s)
    default = load_settings(_write_config(tmp_path, str(tmp_path / "c.db"), "x"), secrets=())
    assert default.database_url is None


def test_a_shared_log_that_is_down_is_one_line_for_every_command(
        pg_free_config: Path) -> None:
    for args in (["report", "--format", "json"], ["purge", "--dry-run"], ["verify"],
                 ["subject", "export", "--caller", "+31201234567"], ["db", "status"],
                 ["calls", "list"], ["callbacks", "export", "--by", "T. Ester"]):
        result = CliRunner().invoke(main, [*args, "--config", str(pg_free_config)])
        assert result.exit_code == 1, (args, result.output)
        assert "postgresql://u@127.0.0.1:1/db: cannot connect to the consent log" \
            in result.stderr
        assert result.stderr.count("\n") == 1


@pytest.fixture
def pg_free_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A shared-log config whose server is never there."""
    monkeypatch.setenv(PGPASS_ENV, "pw")
    yield _write_config(tmp_path, "postgresql://u@127.0.0.1:1/db", "n1",
                        f"database_password_env: {PGPASS_ENV}\n")


def test_the_node_is_in_the_chain_hash_only_when_there_is_one() -> None:
    from consentivr.store import chain_hash

    row = {"seq": 1, "call_id": "c1"}
    assert chain_hash("0", row, "d") == chain_hash("0", {**row, "node": None}, "d")
    assert chain_hash("0", row, "d") != chain_hash("0", {**row, "node": "n1"}, "d")
    assert os.environ.get(PGPASS_ENV) is None


def test_recovery_lookup_reads_both_backends(backend: Backend) -> None:
    import asyncio

    from consentivr.recovery import lookup_for

    backend.add(1, 2)
    log = backend.open()
    try:
        log.mark_recording("c2", True, None, T0)
    finally:
        log.close()
    lookup = lookup_for(backend.settings_for("n1"))
    found = asyncio.run(lookup("1750000000.2"))
    assert found is not None and (found.call_id, found.recording_confirmed) == ("c2", True)
    assert found.decisions == {"callback": "no", "recording": "no"}
    assert asyncio.run(lookup("nope")) is None


# --- purge and subject rights, both backends; files per node on a shared log --------


def _calls_with_files(b: Backend, node: str, ns: range, caller: str = "+31201234567",
                      recording_days: float = 90) -> None:
    settings = b.settings_for(node)
    rec = settings.recordings.dir
    records = []
    for n in ns:
        f = rec / f"c{n}.wav"
        f.write_bytes(b"RIFF....WAVE")
        os.utime(f, (T0, T0))
        records.append(record(n, decided_at=T0 + n, recording=str(f), caller=caller,
                              recording_days=recording_days))
    log = open_consent_log(settings)
    try:
        log.append_many(records)
    finally:
        log.close()


def _rows(b: Backend) -> dict[str, dict[str, Any]]:
    conn = b.reader()
    try:
        return {r["call_id"]: dict(r) for r in conn.execute("SELECT * FROM calls")}
    finally:
        conn.close()


def _cli(b: Backend, node: str, *args: str) -> Any:
    settings = b.settings_for(node)
    result = CliRunner().invoke(main, [*args, "--config", str(settings.source)])
    return result


def test_purge_then_erase_then_verify_on_both_backends(backend: Backend) -> None:
    _calls_with_files(backend, "n1", range(1, 4), recording_days=10)
    _calls_with_files(backend, "n1", range(4, 6), caller="+31207654321", recording_days=900)
    rec = backend.settings_for("n1").recordings.dir
    purge = _cli(backend, "n1", "purge", "--as-of", "2025-07-15T00:00:00Z", "--json")
    assert purge.exit_code == 0, purge.output
    assert json.loads(purge.stdout)["counts"]["recordings_deleted"] == 3
    assert sorted(p.name for p in rec.iterdir()) == ["c4.wav", "c5.wav"]
    export = _cli(backend, "n1", "subject", "export", "--caller", "+31 20 765 4321")
    assert export.exit_code == 0, export.output
    assert [r["call_id"] for r in json.loads(export.stdout)["rows"]] == ["c4", "c5"]
    erase = _cli(backend, "n1", "subject", "erase", "--caller", "+31207654321", "--yes",
                 "--json")
    assert erase.exit_code == 0, erase.output
    assert json.loads(erase.stdout)["counts"]["rows_redacted"] == 2
    assert list(rec.iterdir()) == []
    rows = _rows(backend)
    assert rows["c4"]["redacted_at"] and rows["c4"]["caller_hash"] is None
    assert rows["c1"]["recording_purged_at"] and rows["c1"]["caller_hash"]
    callbacks = _cli(backend, "n1", "callbacks", "export", "--format", "json", "--by", "T. Ester")
    assert callbacks.exit_code == 0 and json.loads(callbacks.stdout) == []
    assert backend.verify().ok


@pytest.mark.postgres
def test_purge_on_a_node_deletes_only_its_own_files(pg: Backend) -> None:
    _calls_with_files(pg, "n1", range(1, 4), recording_days=10)
    _calls_with_files(pg, "n2", range(11, 14), recording_days=10)
    rec1, rec2 = (pg.settings_for(n).recordings.dir for n in ("n1", "n2"))
    # Far past both the recordings' and the log's retention.
    late = "2030-01-01T00:00:00Z"
    first = _cli(pg, "n1", "purge", "--as-of", late, "--json")
    assert first.exit_code == 0, first.output
    assert list(rec1.iterdir()) == [] and len(list(rec2.iterdir())) == 3
    rows = _rows(pg)
    # n1's rows: file gone, then redacted. n2's: untouched, their files are on n2.
    assert all(rows[f"c{n}"]["redacted_at"] for n in (1, 2, 3))
    assert not any(rows[f"c{n}"]["recording_purged_at"] or rows[f"c{n}"]["redacted_at"]
                   for n in (11, 12, 13))
    second = _cli(pg, "n2", "purge", "--as-of", late, "--json")
    assert second.exit_code == 0, second.output
    assert list(rec2.iterdir()) == []
    assert all(r["redacted_at"] for r in _rows(pg).values())
    assert json.loads(second.stdout)["counts"]["rows_redacted"] == 3  # once, not twice
    assert pg.verify().ok


@pytest.mark.postgres
def test_erase_finds_every_nodes_rows_and_the_owner_deletes_its_file(pg: Backend) -> None:
    _calls_with_files(pg, "n1", range(1, 3))
    _calls_with_files(pg, "n2", range(11, 13))
    rec1, rec2 = (pg.settings_for(n).recordings.dir for n in ("n1", "n2"))
    erase = _cli(pg, "n1", "subject", "erase", "--caller", "+31201234567", "--yes")
    assert erase.exit_code == 0, erase.output
    assert ("warning: 2 recording(s) are on other node(s) (n2): each is deleted by that "
            "node's next purge") in erase.output
    assert list(rec1.iterdir()) == [] and len(list(rec2.iterdir())) == 2
    rows = _rows(pg)
    assert rows["c1"]["redacted_at"] and not rows["c11"]["redacted_at"]
    assert rows["c11"]["erase_requested_at"]
    assert pg.verify().ok
    # n2's next purge, long before any retention: the erasure is finished there.
    purge = _cli(pg, "n2", "purge", "--as-of", "2025-06-16T00:00:00Z", "--json")
    assert purge.exit_code == 0, purge.output
    assert list(rec2.iterdir()) == []
    rows = _rows(pg)
    assert all(rows[c]["redacted_at"] and rows[c]["caller_hash"] is None
               for c in ("c1", "c2", "c11", "c12"))
    export = _cli(pg, "n2", "subject", "export", "--caller", "+31201234567")
    assert json.loads(export.stdout)["rows"] == []
    assert pg.verify().ok


@pytest.mark.postgres
def test_one_purge_at_a_time_across_nodes(pg: Backend) -> None:
    from consentivr.pgstore import REDACTION_LOCK

    pg.add(1)
    holder = pg.reader()
    try:
        holder.execute("SELECT pg_advisory_lock(?)", (REDACTION_LOCK,))
        busy = _cli(pg, "n2", "purge", "--dry-run")
        assert busy.exit_code == 4, busy.output
        assert "another purge or erasure is running (on some node)" in busy.stderr
    finally:
        holder.close()
    assert _cli(pg, "n2", "purge", "--dry-run").exit_code == 0


def test_report_on_both_backends(backend: Backend) -> None:
    _calls_with_files(backend, "n1", range(1, 4))
    log = backend.open()
    try:
        log.mark_recording("c1", True, None, T0 + 1)
    finally:
        log.close()
    rl = RecordingLog.for_settings(backend.settings_for("n1"))
    try:
        rl.withdraw("c2", T0 + 12, "agent", recorded=False)
        rl.withdraw("c3", T0 + 33, "agent", recorded=False)
        rl.recording_stopped("1750000000.1", T0 + 61)
    finally:
        rl.close()
    result = _cli(backend, "n1", "report", "--format", "json")
    assert result.exit_code == 3, result.output  # 3: recordings past retention (2025)
    assert "past retention" in result.stderr
    report = json.loads(result.stdout)
    assert report["calls"] == 3 and report["chain"]["ok"] is True
    assert report["recordings"]["count"] == 1 and report["recordings"]["seconds"] == 60.0
    assert report["retention"]["held"] == 3
    agent = next(w for w in report["withdrawals"]["by"] if w["by"] == "agent")
    assert (agent["count"], agent["median_seconds"]) == (2, 40.0)  # withdrawn after 30, 50 s


@pytest.mark.postgres
def test_an_empty_database_is_no_log_for_readers_and_created_by_writers(pg: Backend) -> None:
    verify = CliRunner().invoke(main, ["verify", "--config", str(pg.config)])
    assert verify.exit_code == 1
    assert verify.stderr.strip().endswith(
        "no consent log here (an empty database; `consentivr db upgrade` creates it)")
    purge = CliRunner().invoke(main, ["purge", "--dry-run", "--config", str(pg.config)])
    assert purge.exit_code == 0, purge.output  # a writer creates the schema, as on SQLite
    assert CliRunner().invoke(main, ["verify", "--config", str(pg.config)]).exit_code == 0


@pytest.mark.postgres
def test_doctor_checks_the_shared_log_instead_of_a_file(pg: Backend, tmp_path: Path) -> None:
    from consentivr.doctor import FAIL, OK, _shared_log

    pg.add(1)
    ok = _shared_log(pg.settings_for("n1"))
    assert (ok.status, ok.detail) == (OK, "reachable, schema current")
    (tmp_path / "down").mkdir()
    config = _write_config(tmp_path / "down", "postgresql://u@127.0.0.1:1/db", "n1",
                           f"database_password_env: {PGPASS_ENV}\n")
    down = _shared_log(load_settings(config, secrets=()))
    assert down.status == FAIL and "cannot connect to the consent log" in down.detail
    assert "consentivr db status" in down.fix
