"""``consentivr recording stop|features``: withdrawal of consent during the call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from consentivr.cli.common import config_option, friendly_errors, settings_from, write_atomically
from consentivr.features import applicationmap, withdraw_dialplan

_STOPPED = {
    "stopped": "MixMonitor stopped",
    "not_running": "MixMonitor was not running any more",
    "call_ended": "the call has ended",
    "ended": "the recording had ended already",
    "not_needed": "nothing was recording",
}


@click.group()
def recording() -> None:
    """Stop a call's recording; set up withdrawal by key on the PBX.

    \b
    Example:
      consentivr recording stop 3f2a9c0d4b1e4c0e9a7d2b6f1e3c5a7b
      consentivr recording features --features-out /etc/asterisk/features-consentivr.conf \\
          --dialplan-out /etc/asterisk/extensions-consentivr-withdraw.conf
    """


@recording.command("stop")
@config_option
@click.argument("call_id")
def stop(config_path: str, call_id: str) -> None:
    """Stop a call's recording now: the caller withdrew consent out loud.

    CALL_ID is consentivr's call id (CONSENTIVR_CALL_ID, `calls list`) or Asterisk's
    uniqueid of the caller's channel. MixMonitor is stopped over AMI, the withdrawal
    is logged as made by the agent, and the partial recording is deleted or kept
    per withdrawal.on_withdraw. A call that was never recorded: logged, nothing else.
    Run it as the user that owns the recordings (the service's user).

    \b
    Example:
      consentivr recording stop 3f2a9c0d4b1e4c0e9a7d2b6f1e3c5a7b
    """
    from consentivr.withdrawal import stop_recording

    settings = settings_from(config_path, secrets=("ami",))
    with friendly_errors():
        result, ami = asyncio.run(stop_recording(settings, call_id, by="agent"))
    click.echo(f"{result.describe()}; {_STOPPED.get(ami, ami)}")


@recording.command("features")
@config_option
@click.option("--features-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the [applicationmap] entry here instead of to stdout.")
@click.option("--dialplan-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the [consentivr-withdraw] context here instead of to stdout.")
def features(config_path: str, features_out: Path | None, dialplan_out: Path | None) -> None:
    """Write the Asterisk config for withdrawal by key (withdrawal.keys in the config).

    Two parts: a features.conf entry, to #include inside [applicationmap], and the
    extensions.conf context it runs. Then reload: asterisk -rx 'module reload
    features' and asterisk -rx 'dialplan reload'. Check the keys against your
    features.conf with `consentivr dialplan check --features-conf`.

    \b
    Example:
      consentivr recording features --features-out /etc/asterisk/features-consentivr.conf \\
          --dialplan-out /etc/asterisk/extensions-consentivr-withdraw.conf
      # features.conf:   [applicationmap]
      #                  #include features-consentivr.conf
      # extensions.conf: #include extensions-consentivr-withdraw.conf
    """
    settings = settings_from(config_path)
    parts = [(features_out, applicationmap(settings.withdrawal)),
             (dialplan_out, withdraw_dialplan(settings.withdrawal))]
    for out, text in parts:
        if out is None:
            click.echo(text)
            continue
        with friendly_errors():
            write_atomically(out, text)
        click.echo(f"wrote {out}", err=True)
