"""``consentivr dialplan check|render|schema`` and ``consentivr prompts build|list``.

Each command reads either dialplan files (``FILE...``) or, without files, the
service config (``--config``) and every dialplan file it names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from consentivr.cli.common import config_option, friendly_errors, write_atomically
from consentivr.configfile import load_settings
from consentivr.dialplan import DEFAULT_AGI_URL, MODES, RenderOptions, render
from consentivr.errors import ConfigError
from consentivr.features import DEFAULT_FEATURES_CONF, check_features_file
from consentivr.flowfile import Dialplan, load_dialplans
from consentivr.prompts import (
    PromptError,
    build_prompts,
    manifest_key,
    read_manifest,
    text_prompts,
    tool_versions,
    up_to_date,
)
from consentivr.schema import dialplan_schema
from consentivr.settings import DEFAULT_APP, WithdrawalSettings
from consentivr.text import one_line, strip_controls

DEFAULT_PROMPTS_DIR = "/var/lib/consentivr/prompts"


def _prompts_dir_option(f):  # type: ignore[no-untyped-def]
    return click.option(
        "--prompts-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help=f"With FILE...: where built prompts live [default: {DEFAULT_PROMPTS_DIR}]. "
             "With --config: its prompts_dir.",
    )(f)


def _files_argument(f):  # type: ignore[no-untyped-def]
    return click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))(f)


def _source(files: Sequence[Path], config_path: str,
            prompts_dir: Path | None) -> tuple[Dialplan, str | None, list[str]]:
    """The dialplan to work on, the config's app name (if any), and what it came from.

    Raises ConfigError with every problem found.
    """
    ctx = click.get_current_context()
    config_given = ctx.get_parameter_source("config_path") not in (
        click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)
    if files:
        if config_given:
            raise click.UsageError("give dialplan FILEs or --config, not both")
        directory = (prompts_dir or Path(DEFAULT_PROMPTS_DIR)).resolve()
        return load_dialplans(files, directory), None, [str(f) for f in files]
    if prompts_dir is not None:
        raise click.UsageError("--prompts-dir goes with FILEs; a config has prompts_dir")
    settings = load_settings(config_path, secrets=())
    dialplan = Dialplan(flows=settings.flows, menus=settings.menus,
                        prompts_dir=settings.prompts_dir)
    return dialplan, settings.ari.app if settings.ari else DEFAULT_APP, [config_path]


def _summary(dialplan: Dialplan) -> str:
    flows = ", ".join(dialplan.flows) or "none"
    menus = ", ".join(dialplan.menus) or "none"
    return (f"{len(dialplan.flows)} flow(s): {flows}; {len(dialplan.menus)} menu(s): {menus}")


@click.group()
def dialplan() -> None:
    """Check, render and describe the call flows in dialplan YAML files.

    \b
    Example:
      consentivr dialplan check dialplan/*.yaml
      consentivr dialplan render dialplan/gemeente.yaml -o extensions-consentivr.conf
      consentivr dialplan schema > dialplan.schema.json
    """


@dialplan.command("check")
@_files_argument
@config_option
@_prompts_dir_option
@click.option("--features-conf", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Refuse withdrawal.keys that clash with a code in this features.conf "
                   f"[default: {DEFAULT_FEATURES_CONF} if it exists].")
def check(files: tuple[Path, ...], config_path: str, prompts_dir: Path | None,
          features_conf: Path | None) -> None:
    """Check dialplan files (or the config and its files); list every problem.

    Each problem is one line, FILE:LINE:COLUMN: KEY.PATH: MESSAGE, sorted by line;
    the exit status is 1 when there is any. The withdrawal keys (withdrawal.keys of
    the config, else the default *9) must not clash with a features.conf code.

    \b
    Example:
      consentivr dialplan check dialplan/gemeente.yaml dialplan/minimal.yaml
      consentivr dialplan check --config /etc/consentivr/config.yaml
      consentivr dialplan check --config config.yaml --features-conf /etc/asterisk/features.conf
    """
    try:
        source, app, _ = _source(files, config_path, prompts_dir)
        clashes = _withdrawal_clashes(app is not None, config_path, features_conf)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line)
        sys.exit(1)
    if clashes:
        for line in clashes:
            click.echo(strip_controls(line))
        sys.exit(1)
    click.echo(f"OK: {_summary(source)}")


def _withdrawal_clashes(from_config: bool, config_path: str,
                        features_conf: Path | None) -> list[str]:
    path = features_conf or (DEFAULT_FEATURES_CONF if DEFAULT_FEATURES_CONF.is_file() else None)
    if path is None:
        return []
    keys = (load_settings(config_path, secrets=()).withdrawal.keys if from_config
            else WithdrawalSettings().keys)
    return check_features_file(path, keys)


@dialplan.command("render")
@_files_argument
@config_option
@_prompts_dir_option
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically) instead of to stdout.")
@click.option("--app", default=None,
              help="The Stasis app name [default: ari.app of --config, else consentivr].")
@click.option("--mode", type=click.Choice(MODES), default="ari", show_default=True,
              help="ari: Stasis(app,flow); agi: AGI(agi://.../flow) for a FastAGI adapter.")
@click.option("--agi-url", default=DEFAULT_AGI_URL, show_default=True,
              help="The FastAGI server, with --mode agi.")
def render_command(files: tuple[Path, ...], config_path: str, prompts_dir: Path | None,
                   out: Path | None, app: str | None, mode: str, agi_url: str) -> None:
    """Write the flows as one Asterisk extensions.conf include.

    The file defines [consentivr-entry] (every flow's numbers),
    [consentivr-flow-<flow>] (Stasis, plus a no-recording fallback when the app is
    down) and [consentivr-menu-<menu>]. Include it with #include.

    \b
    Example:
      consentivr dialplan render dialplan/gemeente.yaml -o /etc/asterisk/extensions-consentivr.conf
      asterisk -rx 'dialplan reload'
    """
    with friendly_errors():
        source, config_app, sources = _source(files, config_path, prompts_dir)
        options = RenderOptions(app=app or config_app or "consentivr", mode=mode,
                                agi_url=agi_url)
        text = render(source.flows, source.menus, options, sources)
        if out is None:
            click.echo(text, nl=False)
        else:
            write_atomically(out, text)
            click.echo(f"wrote {one_line(str(out))}: {_summary(source)}", err=True)
    missing = [p for p in text_prompts(source.flows.values(), source.menus.values())
               if not p.path.is_file()]
    if missing:
        click.echo(f"note: {len(missing)} text prompt(s) are not built yet, e.g. "
                   f"{one_line(str(missing[0].path))}: run consentivr prompts build", err=True)


@dialplan.command("schema")
def schema() -> None:
    """Print the JSON Schema of dialplan files, for editors (yaml-language-server).

    \b
    Example:
      consentivr dialplan schema > dialplan/dialplan.schema.json
      # then start a dialplan file with:
      # yaml-language-server: $schema=dialplan.schema.json
    """
    click.echo(json.dumps(dialplan_schema(), indent=2, ensure_ascii=False))


@click.group()
def prompts() -> None:
    """Render the text prompts of the flows into sound files.

    \b
    Example:
      consentivr prompts build --config /etc/consentivr/config.yaml
      consentivr prompts list --json
    """


@prompts.command("build")
@_files_argument
@config_option
@_prompts_dir_option
@click.option("--force", is_flag=True, help="Rebuild every file, even when up to date.")
def build(files: tuple[Path, ...], config_path: str, prompts_dir: Path | None,
          force: bool) -> None:
    """Speak every text prompt with espeak-ng into 8 kHz WAV files (sox).

    Files already up to date (same text, voice and tool versions) are skipped.
    Each file's hash goes into PROMPTS_DIR/manifest.json, and from there into the
    notice version logged with every call.

    \b
    Example:
      consentivr prompts build --config /etc/consentivr/config.yaml
      consentivr prompts build dialplan/gemeente.yaml --prompts-dir /var/lib/consentivr/prompts
    """
    with friendly_errors():
        source, _, _ = _source(files, config_path, prompts_dir)
        items = text_prompts(source.flows.values(), source.menus.values())
        if sys.stderr.isatty() and items:
            with click.progressbar(length=len(items), label="Building prompts",
                                   file=sys.stderr) as bar:
                result = build_prompts(items, source.prompts_dir, force=force,
                                       progress=lambda _item, _built: bar.update(1))
        else:
            result = build_prompts(items, source.prompts_dir, force=force)
    click.echo(f"{len(result.built)} built, {len(result.skipped)} up to date "
               f"in {one_line(str(source.prompts_dir))}")


@prompts.command("list")
@_files_argument
@config_option
@_prompts_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def list_prompts(files: tuple[Path, ...], config_path: str, prompts_dir: Path | None,
                 as_json: bool) -> None:
    """List every text prompt: its file, voice, and whether it is built and current.

    \b
    Example:
      consentivr prompts list dialplan/gemeente.yaml
      consentivr prompts list --json | jq -r 'select(.status != "current") | .file'
    """
    with friendly_errors():
        source, _, _ = _source(files, config_path, prompts_dir)
        items = text_prompts(source.flows.values(), source.menus.values())
        manifest = read_manifest(source.prompts_dir)
        try:
            tools: str | None = tool_versions()
        except PromptError:  # listing works without the tools installed
            tools = None
    for item in items:
        entry = manifest.get(manifest_key(source.prompts_dir, item.stem))
        if not item.path.is_file():
            status = "missing"
        elif tools is not None and up_to_date(item, entry, tools):
            status = "current"
        else:
            status = "stale"
        if as_json:
            click.echo(json.dumps({"file": str(item.path), "voice": item.voice,
                                   "status": status, "text": item.text}, ensure_ascii=False))
        else:
            click.echo(f"{status:8} {item.voice:6} {one_line(str(item.path))}")
