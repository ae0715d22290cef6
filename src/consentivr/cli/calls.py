"""``consentivr calls list|show``: look at the consent log."""

from __future__ import annotations

import json
from typing import Any

import click

from consentivr.cli.common import config_option, friendly_errors, settings_from
from consentivr.settings import Settings


@click.group()
def calls() -> None:
    """Look at the consent log.

    \b
    Example:
      consentivr calls list --limit 20
      consentivr calls show 3f2a9c...
    """


def _open_log(settings: Settings) -> Any:
    from consentivr.consentlog import open_consent_log
    from consentivr.store import ConsentLog, load_or_create_key

    if settings.database_url is not None:  # a shared PostgreSQL log
        with friendly_errors():
            return open_consent_log(settings)
    if not settings.database.exists():
        raise click.ClickException(f"{settings.database}: no consent log yet (no calls so far)")
    with friendly_errors():
        return ConsentLog(settings.database, load_or_create_key(
            settings.database, settings.caller_key, settings.callers.default_region))


@calls.command("list")
@config_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--caller", "number", metavar="NUMBER",
              help="Only this caller's calls; any spelling, e.g. '06-1111 0002'.")
def calls_list(config_path: str, limit: int, as_json: bool, number: str | None) -> None:
    """List the newest calls and their decisions.

    \b
    Example:
      consentivr calls list --limit 10
      consentivr calls list --json | jq .decisions
      consentivr calls list --caller '+31 6 1111 0002'
    """
    log = _open_log(settings_from(config_path))
    if number is not None:
        from consentivr.subject import normalise_number

        with friendly_errors():
            rows = log.calls_of(normalise_number(number), limit=limit)
    else:
        rows = list(log.calls(limit=limit))
    if as_json:
        for row in rows:
            click.echo(json.dumps(_brief(row, full=True), sort_keys=True))
        return
    if not rows:
        click.echo("no calls")
        return
    click.echo(f"{'CALL ID':32}  {'DECIDED (UTC)':19}  {'FLOW':10} {'LANG':4}  DECISIONS  REC")
    for row in rows:
        decisions = ",".join(f"{k}={v}" for k, v in sorted(row["decisions"].items()))
        rec = recording_status(row)
        click.echo(f"{row['call_id']:32}  {row['decided_at'][:19]:19}  {row['flow']:10} "
                   f"{row['language']:4}  {decisions}  {rec}")


@calls.command("show")
@config_option
@click.argument("call_id")
def calls_show(config_path: str, call_id: str) -> None:
    """Show one call's full log row (by our call id or Asterisk's uniqueid).

    \b
    Example:
      consentivr calls show 3f2a9c0d4b1e4c0e9a7d2b6f1e3c5a7b
    """
    log = _open_log(settings_from(config_path))
    row = log.call(call_id)
    if row is None:
        raise click.ClickException(f"no call with id {call_id!r} in {log.path}")
    from consentivr.callbacks import call_history

    # The survey team's side: the export runs that listed it, and "callbacks done".
    reader = log.reader() if hasattr(log, "reader") else log.conn  # a shared log: its session
    row["callbacks"] = call_history(reader, row["call_id"])
    click.echo(json.dumps(_brief(row, full=True), indent=2, sort_keys=True))


def recording_status(row: dict[str, Any]) -> str:
    """The REC column: a withdrawal overrides what the recording did before it."""
    if row.get("withdrawn_at"):
        return f"withdrawn({row.get('withdrawn_by') or '?'})"
    return {1: "confirmed", 0: "FAILED"}.get(row.get("recording_confirmed"), "-")


def _brief(row: dict[str, Any], full: bool) -> dict[str, Any]:
    hidden = {"personal_digest", "prev_hash"} if full else set()
    return {k: v for k, v in row.items() if k not in hidden}
