"""The consent log's wide tables, written once for both backends.

A column is (name, SQLite type, PostgreSQL type, constraint); a type of None leaves
the column out of that backend (``node``, for instance, exists only in a shared
log). :func:`create_table` writes each backend's ``CREATE TABLE`` from the same
list, so the SQLite log (:mod:`consentivr.store`) and the PostgreSQL one
(:mod:`consentivr.pgstore`) cannot drift apart.

These lists are schema version 1 (:mod:`consentivr.schemaversion`): existing logs
have exactly these columns. Changing one is a new schema version with its migration,
never an edit here; ``tests/test_logschema.py`` fails on an edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

Backend = Literal["sqlite", "postgresql"]  # as schemaversion.Schema.backend


class Column(NamedTuple):
    name: str
    sqlite: str | None  # None: not in a SQLite log
    postgres: str | None  # None: not in a PostgreSQL log
    constraint: str = ""


CALLS: tuple[Column, ...] = (
    Column("seq", "INTEGER", "BIGINT", "PRIMARY KEY"),
    Column("call_id", "TEXT", "TEXT", "NOT NULL UNIQUE"),
    Column("node", None, "TEXT", "NOT NULL"),  # the node that wrote the row (chained)
    Column("uniqueid", "TEXT", "TEXT"),
    Column("linkedid", "TEXT", "TEXT"),
    Column("channel", "TEXT", "TEXT"),
    Column("caller_hash", "TEXT", "TEXT"),
    Column("caller_number", "TEXT", "TEXT"),
    Column("flow", "TEXT", "TEXT", "NOT NULL"),
    Column("language", "TEXT", "TEXT", "NOT NULL"),
    Column("notice_version", "TEXT", "TEXT", "NOT NULL"),
    Column("started_at", "TEXT", "TEXT", "NOT NULL"),
    Column("decided_at", "TEXT", "TEXT", "NOT NULL"),
    Column("keys", "TEXT", "TEXT"),
    Column("decisions", "TEXT", "TEXT", "NOT NULL"),
    Column("retention_until", "TEXT", "TEXT", "NOT NULL"),
    Column("recording_path", "TEXT", "TEXT"),
    Column("recording_until", "TEXT", "TEXT"),
    Column("recording_confirmed", "INTEGER", "INTEGER"),
    Column("recording_error", "TEXT", "TEXT"),
    Column("recording_started_at", "TEXT", "TEXT"),
    Column("recording_stopped_at", "TEXT", "TEXT"),
    Column("withdrawn_at", "TEXT", "TEXT"),
    Column("withdrawn_by", "TEXT", "TEXT"),
    Column("callback_until", "TEXT", "TEXT"),
    Column("outcome", "TEXT", "TEXT", "NOT NULL"),
    Column("personal_salt", "TEXT", "TEXT"),
    Column("personal_digest", "TEXT", "TEXT", "NOT NULL"),
    Column("prev_hash", "TEXT", "TEXT", "NOT NULL"),
    Column("row_hash", "TEXT", "TEXT", "NOT NULL"),
    Column("recording_purged_at", "TEXT", "TEXT"),
    Column("redacted_at", "TEXT", "TEXT"),
    # A subject erase on another node: this node's purge finishes it.
    Column("erase_requested_at", None, "TEXT"),
)

# The purge log's runs. SQLite still creates its table from the text in
# consentivr.retention (PURGE_SCHEMA); tests/test_logschema.py holds the two equal.
PURGE_RUNS: tuple[Column, ...] = (
    Column("id", "INTEGER", "BIGSERIAL", "PRIMARY KEY"),
    Column("node", None, "TEXT"),
    Column("kind", "TEXT", "TEXT", "NOT NULL"),  # purge | erase
    Column("started_at", "TEXT", "TEXT", "NOT NULL"),
    Column("finished_at", "TEXT", "TEXT"),
    Column("as_of", "TEXT", "TEXT", "NOT NULL"),
    Column("dry_run", "INTEGER", "INTEGER", "NOT NULL"),
    Column("status", "TEXT", "TEXT", "NOT NULL"),  # running | done | problems | interrupted
    Column("recordings_deleted", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("recordings_missing", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("rows_redacted", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("callers_cleared", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("orphans_found", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("orphans_deleted", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("in_progress", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("refused", "INTEGER", "INTEGER", "NOT NULL DEFAULT 0"),
    Column("head_seq", "INTEGER", "BIGINT"),  # the chain head when the run ended: an anchor
    Column("head_hash", "TEXT", "TEXT"),
    Column("summary", "TEXT", "TEXT"),
)


def create_table(table: str, columns: Sequence[Column], backend: Backend) -> str:
    """``CREATE TABLE`` for one backend, one column a line (no trailing ``;``).

    SQLite's says ``IF NOT EXISTS``: :func:`consentivr.store.open_database` runs it on
    every open. PostgreSQL's runs once, in a migration step.
    """
    lines = []
    for column in columns:
        kind = column.sqlite if backend == "sqlite" else column.postgres
        if kind is not None:
            lines.append(" ".join(filter(None, (f"    {column.name}", kind, column.constraint))))
    head = "CREATE TABLE IF NOT EXISTS" if backend == "sqlite" else "CREATE TABLE"
    return f"{head} {table} (\n" + ",\n".join(lines) + "\n)"
