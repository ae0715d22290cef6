"""The ``consentivr`` command line: the root group, ``serve`` and ``config check``.

Each group of subcommands lives in its own module over the library API and imports
only ``consentivr.cli.common``; this module attaches them all.
"""

from __future__ import annotations

import click

from consentivr import __version__
from consentivr.cli import agi, calls, db, dialplan, install, recording, report, rights
from consentivr.cli.common import (
    config_option,
    friendly_errors,
    log_format_option,
    settings_from,
    setup_logging,
)
from consentivr.text import one_line


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
    main.add_command(calls.calls)
    main.add_command(dialplan.dialplan)
    main.add_command(dialplan.prompts)
    main.add_command(recording.recording)
    main.add_command(agi.agi)
    for command in (*rights.COMMANDS, report.report_command, *install.COMMANDS, db.db):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
