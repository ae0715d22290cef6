"""``consentivr db status|upgrade``: the consent log's schema version, on either backend."""

from __future__ import annotations

import json
import sqlite3

import click

from consentivr.cli.common import config_option, friendly_errors, settings_from
from consentivr.schemaversion import SQLITE, refusal
from consentivr.settings import Settings


def _state(settings: Settings, upgrade: bool) -> dict[str, object]:
    if settings.database_url is not None:
        from consentivr import pgstore

        conn = pgstore.connect(settings.database_url, settings.database_password)
        try:
            applied = pgstore.upgrade(conn) if upgrade else []
            version = pgstore.schema_state(conn)
        finally:
            conn.close()
        where, schema = pgstore.safe_url(settings.database_url), pgstore.POSTGRES
    else:
        from consentivr.store import open_database

        where, schema, applied = str(settings.database), SQLITE, []
        if not settings.database.exists() and not upgrade:
            version = None
        else:
            # open_database creates a new log, stamps an unversioned one as 1 and
            # refuses one it cannot run; SQLite has had no migration yet.
            open_database(settings.database).close()
            conn = sqlite3.connect(settings.database)
            try:
                version = int(conn.execute(
                    "SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            finally:
                conn.close()
    problem = None if version is None else refusal(schema, where, version)
    return {"backend": schema.backend, "database": where, "version": version,
            "current": schema.current, "applied": applied, "ok": problem is None,
            "problem": problem}


@click.group()
def db() -> None:
    """The consent log's schema: which version it has, and upgrading it.

    \b
    Example:
      consentivr db status
      consentivr db upgrade
    """


@db.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def db_status(config_path: str, as_json: bool) -> None:
    """Show the log's schema version and the one this consentivr needs.

    \b
    Exit codes: 0 current, 1 older or newer (see the message), or unreadable.

    \b
    Example:
      consentivr db status --json | jq .version
    """
    settings = settings_from(config_path)
    with friendly_errors():
        state = _state(settings, upgrade=False)
    if as_json:
        click.echo(json.dumps(state, indent=2))
    elif state["version"] is None:
        click.echo(f"{state['database']}: no consent log yet; `consentivr db upgrade` "
                   f"creates schema version {state['current']}")
    else:
        click.echo(f"{state['database']} ({state['backend']}): schema version "
                   f"{state['version']}, this consentivr needs {state['current']}")
    if not state["ok"]:
        raise click.ClickException(str(state["problem"]))


@db.command("upgrade")
@config_option
def db_upgrade(config_path: str) -> None:
    """Bring the log to this consentivr's schema (creating it if empty).

    Each step runs in one transaction; on PostgreSQL under the chain lock, so the
    nodes' writers wait for it. Run it once, from any node, before starting the
    new version on the nodes.

    \b
    Example:
      consentivr db upgrade
    """
    settings = settings_from(config_path)
    with friendly_errors():
        state = _state(settings, upgrade=True)
    applied = state["applied"]
    done = (f"applied version(s) {', '.join(map(str, applied))}"  # type: ignore[call-overload]
            if applied else "already current")
    click.echo(f"{state['database']}: schema version {state['version']} ({done})")
