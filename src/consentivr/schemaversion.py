"""The consent log's schema version, for both backends (``consentivr db status|upgrade``).

The version lives in the log itself (``meta.schema_version``). A log older than this
consentivr is refused with one line naming ``consentivr db upgrade``; a newer one is
refused too (an older consentivr must not write a schema it does not know). Nothing
is guessed: an empty database is created at the current version, and a SQLite log
from before versioning existed (a ``calls`` table, no ``meta`` row) is version 1 by
definition, the schema every such log has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consentivr.errors import StoreError


@dataclass(frozen=True)
class Schema:
    """One backend's migrations: version N's statements bring N-1 to N."""

    backend: str  # sqlite | postgresql
    steps: Mapping[int, tuple[str, ...]]
    param: str  # the driver's placeholder: ? or %s

    @property
    def current(self) -> int:
        return max(self.steps)


# SQLite: version 1 is the schema store.open_database creates (store._SCHEMA).
SQLITE = Schema("sqlite", {1: ()}, "?")


def stored_version(schema: Schema, conn: Any) -> int | None:
    """The version the log says it has; None when it has no ``meta`` row (yet)."""
    row = conn.execute(
        f"SELECT value FROM meta WHERE key = {schema.param}", ("schema_version",)).fetchone()
    if row is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"meta.schema_version is not a number: {row[0]!r}") from exc


def stamp(schema: Schema, conn: Any, version: int) -> None:
    if schema.backend == "sqlite":
        sql = "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)"
    else:
        sql = ("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
               "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")
    conn.execute(sql, (str(version),))


def refusal(schema: Schema, where: str, version: int) -> str | None:
    """The one line that refuses a log at ``version``; None when it is current."""
    if version < schema.current:
        return (f"{where}: the consent log has schema version {version}, this consentivr "
                f"needs {schema.current}: run `consentivr db upgrade`")
    if version > schema.current:
        return (f"{where}: the consent log has schema version {version}, newer than this "
                f"consentivr knows ({schema.current}): upgrade consentivr")
    return None


def check_version(schema: Schema, conn: Any, where: str, fresh: bool) -> None:
    """Refuse a log whose schema is not this consentivr's; stamp a new SQLite log."""
    version = stored_version(schema, conn)
    if version is None:
        # SQLite: a fresh file was just created at the current schema; an unversioned
        # file is the schema before versioning, which is version 1.
        version = schema.current if fresh else 1
        stamp(schema, conn, version)
    problem = refusal(schema, where, version)
    if problem is not None:
        raise StoreError(problem)
