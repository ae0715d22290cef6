"""The ``consentivr`` command line: thin click commands over the library.

Library errors (``ConsentivrError``) become one-line ``click.ClickException``s
here and only here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from consentivr import __version__
from consentivr.config import Settings, load_settings
from consentivr.errors import ConfigError, ConsentivrError
from consentivr.text import one_line, strip_controls

DEFAULT_CONFIG = "/etc/consentivr/config.yaml"
F = TypeVar("F", bound=Callable[..., Any])


def config_option(f: F) -> F:
    return click.option(
        "--config", "-c", "config_path", type=click.Path(dir_okay=False),
        default=lambda: os.environ.get("CONSENTIVR_CONFIG", DEFAULT_CONFIG),
        show_default=f"$CONSENTIVR_CONFIG or {DEFAULT_CONFIG}",
        help="The service config file.",
    )(f)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn library errors into one-line CLI errors; config errors list every problem."""
    try:
        yield
    except ConfigError as exc:
        for line in exc.problems[:-1]:
            click.echo(f"Error: {_safe(line)}", err=True)
        raise click.ClickException(_safe(exc.problems[-1]) if exc.problems
                                   else "invalid config") from None
    except ConsentivrError as exc:
        raise click.ClickException(_safe(str(exc))) from None
    except OSError as exc:
        name = one_line(os.fsdecode(exc.filename)) if exc.filename else ""
        raise click.ClickException(f"{name}: {exc.strerror}".strip(": ")) from None


def _safe(message: str) -> str:
    """One line, no control bytes: messages quote paths, but never trust that alone."""
    return " ".join(strip_controls(" ".join(message.split())).split())


def write_atomically(path: Path, text: str) -> None:
    """Replace a config file Asterisk reads in one step: never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # Asterisk reads it as its own user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def log_format_option(f: F) -> F:
    return click.option(
        "--log-format", type=click.Choice(["json", "text"]), default=None,
        show_default="json when $JOURNAL_STREAM is set (under systemd), else text",
        help="json: one object per line, for journald and log shippers.",
    )(f)


def setup_logging(log_format: str | None, verbose: bool) -> None:
    from consentivr.logformat import setup_logging as setup

    setup(log_format, verbose)


def settings_from(config_path: str, secrets: tuple[str, ...] = (),
                  require: tuple[str, ...] = ()) -> Settings:
    """The config, with the passwords of only the ``secrets`` sections read: an admin
    command needs neither the ARI nor the AMI password in its environment."""
    with friendly_errors():
        return load_settings(config_path, secrets=secrets, require=require)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="consentivr")
def main() -> None:
    """GDPR consent for recorded calls on a self-hosted Asterisk PBX.

    Callers hear a privacy notice and choose, per purpose, whether their call is
    recorded and whether they may be called back for a quality survey. Every
    decision is logged; recordings start only after a logged yes.

    \b
    Example:
      consentivr serve --config /etc/consentivr/config.yaml
      consentivr calls list --json
    """


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@log_format_option
def serve(config_path: str, verbose: bool, log_format: str | None) -> None:
    """Run the ARI (Stasis) app until SIGTERM; log one line per decision.

    \b
    Example:
      consentivr serve --config /etc/consentivr/config.yaml
      consentivr serve --log-format json 2>&1 | jq 'select(.event == "decision")'
    """
    from consentivr import accelerators
    from consentivr.service import serve as run_service

    settings = settings_from(config_path, secrets=("ari", "ami"), require=("ari",))
    setup_logging(log_format, verbose)
    with friendly_errors():
        accelerators.run(run_service(settings))  # uvloop when installed


@main.group()
def config() -> None:
    """Check the service config.

    \b
    Example:
      consentivr config check --config config.yaml
    """


@config.command("check")
@config_option
def config_check(config_path: str) -> None:
    """Check a config file and every dialplan file it names; list all problems.

    \b
    Example:
      consentivr config check --config config.example.yaml
    """
    settings = settings_from(config_path, secrets=("ari", "ami"))  # check every secret
    click.echo(f"{one_line(config_path)}: OK ({len(settings.flows)} flow(s): "
               f"{', '.join(settings.flows)})")


@main.group()
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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def demo() -> None:
    """The three-call demo moved to the test bench: run ./dev demo in a source checkout.

    \b
    Example:
      sudo ./dev demo
    """
    raise click.ClickException(
        "the demo is part of the test bench, not the installed package: "
        "run `sudo ./dev demo` in a consentivr source checkout"
    )


def _register() -> None:
    """Attach the command groups that live in their own modules."""
    from consentivr.cli import dialplan as dialplan_cli

    main.add_command(dialplan_cli.dialplan)
    main.add_command(dialplan_cli.prompts)

    from consentivr.cli import agi as agi_cli
    from consentivr.cli import recording

    main.add_command(recording.recording)
    main.add_command(agi_cli.agi)

    from consentivr.cli import rights

    for command in rights.COMMANDS:
        main.add_command(command)

    from consentivr.cli import report

    main.add_command(report.report_command)

    from consentivr.cli import install

    for command in install.COMMANDS:
        main.add_command(command)

    from consentivr.cli import db

    main.add_command(db.db)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
