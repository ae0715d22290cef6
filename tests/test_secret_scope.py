"""Secrets only where needed (issue 19): each command reads the passwords of only the
sections it uses, and FastAGI mode needs no ``ari:`` section.

The config gives both passwords as ``*_env`` variables that are not set, as a shipped
systemd purge unit would see it: the admin commands must still work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.store import ConsentLog, load_or_create_key
from consentivr_testbed.testbed import flow_yaml

ARI = """\
ari:
  url: http://127.0.0.1:8088
  username: consentivr
  password_env: CVR_TEST_ARI_PASSWORD
"""
AMI = """\
ami:
  host: 127.0.0.1
  port: 5038
  username: consentivr
  password_env: CVR_TEST_AMI_PASSWORD
"""


def _config(tmp_path: Path, with_ari: bool = True) -> Path:
    flows = "\n".join("  " + line for line in flow_yaml().splitlines())
    path = tmp_path / "config.yaml"
    path.write_text((ARI if with_ari else "") + AMI + f"""\
database: {tmp_path / "consent.db"}
recordings: {{dir: {tmp_path / "rec"}}}
prompts_dir: {tmp_path / "prompts"}
flows:
{flows}
""", encoding="utf-8")
    db = tmp_path / "consent.db"
    ConsentLog(db, load_or_create_key(db, None)).close()  # an empty log, as after a day off
    return path


@pytest.fixture(autouse=True)
def _no_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVR_TEST_ARI_PASSWORD", raising=False)
    monkeypatch.delenv("CVR_TEST_AMI_PASSWORD", raising=False)


@pytest.mark.parametrize("args", [
    ["calls", "list"],
    ["verify"],
    ["purge", "--dry-run"],
    ["subject", "export", "--caller", "+31201234567"],
    ["callbacks", "export", "--by", "test"],
    ["dialplan", "render"],
], ids=lambda a: " ".join(a[:2]))
def test_admin_commands_need_neither_ari_nor_ami_password(tmp_path: Path,
                                                          args: list[str]) -> None:
    config = _config(tmp_path)
    if args[0] == "subject":
        args = [*args, "--out", str(tmp_path / "export")]
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert "CVR_TEST_" not in result.output, result.output
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("args", "missing", "not_missing"), [
    (["serve"], "CVR_TEST_ARI_PASSWORD", None),
    (["agi"], "CVR_TEST_AMI_PASSWORD", "CVR_TEST_ARI_PASSWORD"),
    (["recording", "stop", "0123456789abcdef0123456789abcdef"], "CVR_TEST_AMI_PASSWORD",
     "CVR_TEST_ARI_PASSWORD"),
    (["config", "check"], "CVR_TEST_ARI_PASSWORD", None),
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else str(a))
def test_service_commands_read_the_passwords_they_use(
        tmp_path: Path, args: list[str], missing: str, not_missing: str | None) -> None:
    result = CliRunner().invoke(main, [*args, "--config", str(_config(tmp_path))])
    assert result.exit_code != 0
    assert f"environment variable {missing} is not set" in result.output
    if not_missing:
        assert not_missing not in result.output


def test_fastagi_mode_needs_no_ari_section(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, with_ari=False)
    monkeypatch.setenv("CVR_TEST_AMI_PASSWORD", "a-long-enough-ami-password")
    settings = load_settings(config, secrets=("ami",))
    assert settings.ari is None
    assert settings.ami is not None and settings.ami.password == "a-long-enough-ami-password"
    # ARI mode does need it, and says so in one positioned line.
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code != 0
    [line] = [x for x in result.output.splitlines() if x.strip()]
    assert f"{config}:1:1" in line and "'ari'" in line
