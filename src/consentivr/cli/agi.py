"""``consentivr agi``: the FastAGI server, for dialplans that use ``AGI()``."""

from __future__ import annotations

import click

from consentivr import accelerators
from consentivr.cli.common import (
    config_option,
    friendly_errors,
    log_format_option,
    settings_from,
    setup_logging,
)

DEFAULT_LISTEN = "127.0.0.1:4573"


def _listen(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, int]:
    from consentivr.agi import parse_listen

    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("agi")
@config_option
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, callback=_listen,
              help="host:port to accept FastAGI connections on. AGI has no authentication: "
                   "keep it on 127.0.0.1 or a firewalled address.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@log_format_option
def agi(config_path: str, listen: tuple[str, int], verbose: bool,
        log_format: str | None) -> None:
    """Run the FastAGI server until SIGTERM; log one line per decision.

    The same flows, consent log and recording rules as `serve` (ARI), for
    dialplans that send calls to AGI(agi://host:port/<flow>). Recording is
    started with MixMonitor on the call's own channel, after a logged yes.
    `consentivr dialplan render --mode agi` writes the matching dialplan.

    \b
    Example:
      consentivr agi --config /etc/consentivr/config.yaml
      consentivr agi --listen 127.0.0.1:4573
      ; extensions.conf:
      exten => 100,1,AGI(agi://127.0.0.1:4573/main)
    """
    from consentivr.agi import serve

    settings = settings_from(config_path, secrets=("ami",))
    setup_logging(log_format, verbose)
    host, port = listen
    with friendly_errors():
        accelerators.run(serve(settings, host, port))  # uvloop when installed
