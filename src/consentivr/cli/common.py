"""What every ``consentivr`` subcommand shares: the --config option, error display,
loading settings, atomic writes and logging setup.

Library errors (``ConsentivrError``) become one-line ``click.ClickException``s here
and only here. The subcommand modules import this module, never each other or the
root group (``consentivr.cli.main``), so the CLI has no import cycle.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from consentivr.configfile import load_settings
from consentivr.errors import ConfigError, ConsentivrError
from consentivr.settings import Settings
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


# Exit codes beyond click's 1 (error) and 2 (usage): a run that finished but left
# items for a person to look at, and a run refused because another holds the lock.
EXIT_PROBLEMS = 3
EXIT_BUSY = 4


class NeedsAttention(click.ClickException):
    exit_code = EXIT_PROBLEMS


class Busy(click.ClickException):
    exit_code = EXIT_BUSY
