"""``consentivr doctor``, ``consentivr asterisk-config`` and ``consentivr example-config``:
installing it, and checking the install."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

import click

from consentivr.cli.common import config_option, friendly_errors, settings_from, write_atomically


@click.command("doctor")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
@click.option("--user", default="consentivr", show_default=True,
              help="The service's user (USER, or UID:GID,GID...); whoever runs doctor "
                   "when no such user exists.")
@click.option("--purge-user", default=None, help="The purge's user [default: --user].")
@click.option("--asterisk-user", default="asterisk", show_default=True,
              help="Asterisk's run user (USER, UID or UID:GID), for the prompts check.")
@click.option("--agi-url", default=None,
              help="The FastAGI URL the dialplan was rendered with (FastAGI-only configs).")
def doctor(config_path: str, as_json: bool, user: str, purge_user: str | None,
           asterisk_user: str, agi_url: str | None) -> None:
    """Check the live PBX and this host; print one line per check, with the fix.

    ARI, Asterisk's HTTP bind, AMI login and events, the withdrawal feature and
    context, the rendered dialplan (equal to a fresh render), prompts, a probe
    recording by Asterisk's user into the recordings dir (deleted again), the
    consent log and key for the service and purge users, and the secrets' modes.
    Exit status 0 only when no check failed (warnings pass). Run it as root.

    \b
    Example:
      consentivr doctor --config /etc/consentivr/config.yaml
      consentivr doctor --config /etc/consentivr/config.yaml --json | jq 'select(.status=="fail")'
    """
    from consentivr.dialplan import DEFAULT_AGI_URL
    from consentivr.doctor import Account, Options, run_checks

    settings = settings_from(config_path, secrets=("ari", "ami"))
    with friendly_errors():
        service = Account.default(user, "user")
        options = Options(
            config_path=config_path, user=service,
            purge_user=Account.parse(purge_user, "purge-user") if purge_user else service,
            asterisk=Account.default(asterisk_user, "asterisk-user"),
            agi_url=agi_url or DEFAULT_AGI_URL)
        checks = asyncio.run(run_checks(settings, options))
    for check in checks:
        click.echo(json.dumps(check.as_dict(), ensure_ascii=False) if as_json else check.line())
    failed = [c for c in checks if not c.passed]
    if not as_json:
        click.echo(f"{len(failed)} of {len(checks)} checks failed" if failed
                   else f"all {len(checks)} checks passed", err=True)
    sys.exit(1 if failed else 0)


@click.command("asterisk-config")
@config_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the files into this dir (e.g. /etc/asterisk) instead of stdout.")
@click.option("--mode", type=click.Choice(["ari", "agi"]), default=None,
              help="[default: ari with an ari: section, else agi]")
@click.option("--agi-url", default=None, help="The FastAGI server, with --mode agi.")
@click.option("--add-includes", is_flag=True,
              help="With --out: append the missing #include lines to the stock files there.")
def asterisk_config(config_path: str, out: Path | None, mode: str | None,
                    agi_url: str | None, add_includes: bool) -> None:
    """Write the Asterisk config this install needs, from the service config.

    http-consentivr.conf and ari-consentivr.conf (ARI), manager.d/consentivr.conf
    (the AMI user, with the classes it needs and why), features-consentivr.conf (the
    withdrawal key), extensions-consentivr.conf (the rendered flows, as `dialplan
    render`) and extensions-consentivr-withdraw.conf (the withdrawal context, as
    `recording features`, and doctor's probe). Add the #include lines it prints to
    the stock files once (--add-includes does it). Files with a password are
    written 0640, group asterisk.

    \b
    Example:
      consentivr asterisk-config --config /etc/consentivr/config.yaml
      consentivr asterisk-config --config /etc/consentivr/config.yaml \\
          --out /etc/asterisk --add-includes
      asterisk -rx 'core reload'
    """
    from consentivr import asteriskconfig
    from consentivr.dialplan import DEFAULT_AGI_URL

    if add_includes and out is None:
        raise click.UsageError("--add-includes needs --out (the dir of the stock files)")
    settings = settings_from(config_path, secrets=("ari", "ami"), require=("ami",))
    mode = mode or ("ari" if settings.ari is not None else "agi")
    with friendly_errors():
        parts = asteriskconfig.snippets(settings, mode, agi_url or DEFAULT_AGI_URL)
        for part in parts:
            if out is None:
                click.echo(f"; ===== {part.path} =====\n{part.text}")
                continue
            path = out / part.path
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, part.text)
            if part.secret:
                _secret_mode(path)
            click.echo(f"wrote {path}", err=True)
        if add_includes:
            assert out is not None
            for name, line in asteriskconfig.add_includes(out, mode):
                click.echo(f"added to {out / name}: {line}", err=True)
            return
    needed = (asteriskconfig.missing_includes(out, mode) if out is not None
              else asteriskconfig.include_lines(mode))
    if needed:
        click.echo("\nAdd once, at the END of each stock file (or use --add-includes):",
                   err=True)
        for name, line in needed:
            click.echo(f"  {name}: {line}", err=True)


def _secret_mode(path: Path) -> None:
    """root (or whoever writes it):asterisk 0640: Asterisk reads it, nobody else."""
    import grp

    os.chmod(path, 0o640)
    try:
        os.chown(path, -1, grp.getgrnam("asterisk").gr_gid)
    except (KeyError, PermissionError):
        click.echo(f"note: {path}: no group asterisk here; give Asterisk's group read "
                   "access yourself", err=True)


@click.command("example-config")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The config dir, e.g. /etc/consentivr.")
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def example_config(out: Path, force: bool) -> None:
    """Copy the example config.yaml and dialplan/*.yaml (shipped with the package).

    \b
    Example:
      consentivr example-config --out /etc/consentivr
    """
    source = resources.files("consentivr") / "examples"
    with friendly_errors():
        for name in ("config.yaml", "dialplan/minimal.yaml", "dialplan/gemeente.yaml",
                     "dialplan/dialplan.schema.json"):
            target = out / name
            if target.exists() and not force:
                click.echo(f"kept {target} (exists; --force overwrites)", err=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with resources.as_file(source / name) as src:
                shutil.copyfile(src, target)
            os.chmod(target, 0o640)
            click.echo(f"wrote {target}", err=True)


COMMANDS = (doctor, asterisk_config, example_config)
