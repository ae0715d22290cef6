"""The command line as users meet it: help with examples, one-line errors."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from consentivr.cli.main import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


ALL_COMMANDS = _commands(main)


def test_every_issue_command_exists() -> None:
    names = {" ".join(c) for c in ALL_COMMANDS}
    expected = {
        "serve", "agi", "demo", "calls list", "calls show", "config check", "purge",
        "verify", "subject export", "subject erase", "callbacks export", "callbacks done",
        "recording stop",
        "dialplan check", "dialplan render", "dialplan schema", "prompts build",
    }
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "consentivr")
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"consentivr {' '.join(path)} --help has no example"


BAD_CONFIGS = [
    ("missing file", None, "file not found"),
    ("not yaml", "ari: [unclosed\n", "invalid YAML"),
    ("unknown key", "ari: {url: http://x, username: a, password: b}\ndatabase: x.db\n"
                    "recordings: {dir: r}\nflows: {}\nbogus: 1\n", "bogus: unknown key"),
    ("bad timeout", "ari: {url: http://x, username: a, password: b}\ndatabase: x.db\n"
                    "recordings: {dir: r}\nflows:\n  main:\n    languages: [en]\n"
                    "    notice: {en: hello-world}\n    purposes:\n      recording:\n"
                    "        basis: consent\n        retention_days: 90\n"
                    "        yes_key: 1\n        no_key: 2\n        timeout: soon\n"
                    "        question: {en: beep}\n"
                    "    destination: {context: d}\n",
     "flows.main.purposes.recording.timeout: expected a positive number of seconds"),
]


@pytest.mark.parametrize(("label", "text", "message"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
@pytest.mark.parametrize("command", [["config", "check"], ["calls", "list"], ["serve"],
                                     ["purge"], ["verify"]])
def test_bad_config_is_one_line_and_no_traceback(
    tmp_path: Path, label: str, text: str | None, message: str, command: list[str],
) -> None:
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    result = CliRunner().invoke(main, [*command, "--config", str(config)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert errors and all(str(config) in line for line in errors), result.output
    assert any(message in line for line in errors), result.output


def test_demo_says_in_one_line_where_it_went() -> None:
    """The demo needs the test bench (sandbox PBX, sipp), which the wheel does not ship."""
    result = CliRunner().invoke(main, ["demo", "--caller", "local"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: the demo is part of the test bench, not the installed package: "
        "run `sudo ./dev demo` in a consentivr source checkout\n"
    )


def test_the_test_bench_demo_has_help_with_an_example() -> None:
    from consentivr_testbed.demo import demo

    result = CliRunner().invoke(demo, ["--help"])
    assert result.exit_code == 0 and "sudo ./dev demo" in result.output
