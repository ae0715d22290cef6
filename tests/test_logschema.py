"""The tables generated from :mod:`consentivr.logschema` are schema version 1 on both
backends: the same columns, in the same order, with the same types, constraints and
defaults as every existing log, so that no log needs a migration.

The reference is the DDL as released (copied from store.py, retention.py and
pgstore.py before logschema.py existed). Never edit it: a change to the tables is a
new schema version with its migration, and this test is what notices one that is not.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from consentivr.logschema import CALLS, PURGE_RUNS, Column, create_table
from consentivr.pgstore import connect, upgrade
from consentivr.purgelog import open_log
from tests.pg_fixtures import PgServer

# --- version 1, as released -----------------------------------------------------------

SQLITE_CALLS_V1 = """CREATE TABLE calls (
    seq INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL UNIQUE,
    uniqueid TEXT,
    linkedid TEXT,
    channel TEXT,
    caller_hash TEXT,
    caller_number TEXT,
    flow TEXT NOT NULL,
    language TEXT NOT NULL,
    notice_version TEXT NOT NULL,
    started_at TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    keys TEXT,
    decisions TEXT NOT NULL,
    retention_until TEXT NOT NULL,
    recording_path TEXT,
    recording_until TEXT,
    recording_confirmed INTEGER,
    recording_error TEXT,
    recording_started_at TEXT,
    recording_stopped_at TEXT,
    withdrawn_at TEXT,
    withdrawn_by TEXT,
    callback_until TEXT,
    outcome TEXT NOT NULL,
    personal_salt TEXT,
    personal_digest TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL,
    recording_purged_at TEXT,
    redacted_at TEXT
)"""

SQLITE_PURGE_RUNS_V1 = """CREATE TABLE purge_runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    as_of TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    status TEXT NOT NULL,
    recordings_deleted INTEGER NOT NULL DEFAULT 0,
    recordings_missing INTEGER NOT NULL DEFAULT 0,
    rows_redacted INTEGER NOT NULL DEFAULT 0,
    callers_cleared INTEGER NOT NULL DEFAULT 0,
    orphans_found INTEGER NOT NULL DEFAULT 0,
    orphans_deleted INTEGER NOT NULL DEFAULT 0,
    in_progress INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    head_seq INTEGER,
    head_hash TEXT,
    summary TEXT
)"""


def _edited(text: str, *edits: tuple[str, str]) -> str:
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


# PostgreSQL's, as released: SQLite's with a node column, 64-bit keys, and the mark a
# subject erase on another node leaves for this node's purge.
POSTGRES_CALLS_V1 = _edited(
    SQLITE_CALLS_V1,
    ("seq INTEGER PRIMARY KEY", "seq BIGINT PRIMARY KEY"),
    ("UNIQUE,\n", "UNIQUE,\n    node TEXT NOT NULL,\n"),
    ("redacted_at TEXT\n", "redacted_at TEXT,\n    erase_requested_at TEXT\n"),
)
POSTGRES_PURGE_RUNS_V1 = _edited(
    SQLITE_PURGE_RUNS_V1,
    ("id INTEGER PRIMARY KEY,\n", "id BIGSERIAL PRIMARY KEY,\n    node TEXT,\n"),
    ("head_seq INTEGER", "head_seq BIGINT"),
)

# table -> (its columns in logschema, SQLite's version 1, PostgreSQL's version 1)
TABLES: dict[str, tuple[tuple[Column, ...], str, str]] = {
    "calls": (CALLS, SQLITE_CALLS_V1, POSTGRES_CALLS_V1),
    "purge_runs": (PURGE_RUNS, SQLITE_PURGE_RUNS_V1, POSTGRES_PURGE_RUNS_V1),
}


# --- what a table looks like to each database -------------------------------------------


def sqlite_shape(conn: sqlite3.Connection, table: str) -> dict[str, Any]:
    """Columns (order, type, NOT NULL, default, key), UNIQUE/PK indexes, foreign keys."""
    indexes = [(unique, origin, [i[2] for i in conn.execute(f"PRAGMA index_info({name})")])
               for _, name, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})")
               if origin != "c"]  # "c": a CREATE INDEX of its own, not part of the table
    return {
        "columns": conn.execute(f"PRAGMA table_info({table})").fetchall(),
        "indexes": sorted(indexes),
        "foreign_keys": conn.execute(f"PRAGMA foreign_key_list({table})").fetchall(),
    }


POSTGRES_SHAPE = {
    "columns": "SELECT ordinal_position, column_name, data_type, is_nullable, column_default "
               "FROM information_schema.columns WHERE table_schema = current_schema() "
               "AND table_name = %s ORDER BY ordinal_position",
    "constraints": "SELECT conname, contype, pg_get_constraintdef(oid) AS def "
                   "FROM pg_constraint WHERE conrelid = %s::regclass ORDER BY conname",
}


def postgres_shape(url: str, password: str, table: str) -> dict[str, Any]:
    conn = connect(url, password)
    try:
        return {what: conn.execute(sql, (table,)).fetchall()
                for what, sql in POSTGRES_SHAPE.items()}
    finally:
        conn.close()


# --- SQLite ---------------------------------------------------------------------------


@pytest.fixture
def v1_sqlite(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "v1.db")
    for _, sqlite_ddl, _ in TABLES.values():
        conn.execute(sqlite_ddl)
    return conn


@pytest.fixture
def new_log(tmp_path: Path) -> sqlite3.Connection:
    """A log as consentivr creates it today: consent log plus purge log."""
    (tmp_path / "var").mkdir(mode=0o700)
    open_log(tmp_path / "var" / "consent.db").close()
    return sqlite3.connect(tmp_path / "var" / "consent.db")


@pytest.mark.parametrize("table", sorted(TABLES))
def test_generated_sqlite_table_is_version_1(v1_sqlite: sqlite3.Connection, tmp_path: Path,
                                             table: str) -> None:
    # purge_runs: SQLite logs get it through purgelog.PURGE_SCHEMA, generated from here.
    generated = sqlite3.connect(tmp_path / "generated.db")
    generated.execute(create_table(table, TABLES[table][0], "sqlite"))
    assert sqlite_shape(generated, table) == sqlite_shape(v1_sqlite, table)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_a_new_sqlite_log_has_the_version_1_tables(v1_sqlite: sqlite3.Connection,
                                                   new_log: sqlite3.Connection,
                                                   table: str) -> None:
    assert sqlite_shape(new_log, table) == sqlite_shape(v1_sqlite, table)


def test_a_new_sqlite_log_stores_the_calls_table_text_of_version_1(
        new_log: sqlite3.Connection) -> None:
    # Byte for byte what older consentivr wrote: `.schema` and any tool that compares
    # it see no difference between an old log and a new one.
    stored = new_log.execute("SELECT sql FROM sqlite_master WHERE name = 'calls'").fetchone()
    assert stored == (SQLITE_CALLS_V1,)


# --- PostgreSQL (a real server) ---------------------------------------------------------


@pytest.mark.parametrize("table", sorted(TABLES))
def test_a_new_postgres_log_has_the_version_1_tables(pg_server: PgServer, table: str) -> None:
    v1 = pg_server.new_database()
    conn = connect(v1, pg_server.password)
    try:
        for _, _, postgres_ddl in TABLES.values():
            conn.execute(postgres_ddl)
    finally:
        conn.close()
    today = pg_server.new_database()
    conn = connect(today, pg_server.password)
    try:
        assert upgrade(conn) == [1]
    finally:
        conn.close()
    want = postgres_shape(v1, pg_server.password, table)
    assert want["columns"], f"{table}: the reference created no columns"
    assert postgres_shape(today, pg_server.password, table) == want

