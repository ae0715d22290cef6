"""``prompts build``: the wording placeholders fill in, and real audio from espeak-ng
and sox, rebuilt only when out of date, with hashes that reach the notice version."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.dialplan import prompts
from consentivr.flowfile import load_dialplans
from consentivr.prompts import (
    MANIFEST,
    PromptError,
    build_prompts,
    default_voice,
    text_prompts,
    tool_versions,
)
from consentivr.wording import (
    PlaceholderError,
    fill,
    key_phrase,
    placeholders,
    retention_phrase,
)

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "dialplan" / "minimal.yaml"
GEMEENTE = ROOT / "dialplan" / "gemeente.yaml"
needs_tts = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="espeak-ng and sox are not installed (apt-get install espeak-ng sox)")


@pytest.mark.parametrize(("days", "language", "phrase"), [
    (90, "en", "three months"),
    (90, "nl", "drie maanden"),
    (30, "en", "one month"),
    (30, "nl", "één maand"),
    (30, "de", "einen Monat"),
    (7, "fr", "une semaine"),
    (14, "en", "two weeks"),
    (365, "nl", "één jaar"),
    (730, "nl", "twee jaar"),
    (730, "en", "two years"),
    (45, "en", "45 days"),
    (1, "en", "one day"),
    (400, "nl", "400 dagen"),
    (390, "en", "13 months"),
    (90, "nl_BE", "drie maanden"),
    (90, "en-GB", "three months"),
])
def test_retention_phrase(days: int, language: str, phrase: str) -> None:
    assert retention_phrase(days, language) == phrase


def test_retention_phrase_without_wording() -> None:
    with pytest.raises(KeyError):
        retention_phrase(90, "tr")


@pytest.mark.parametrize(("key", "language", "spoken"), [
    ("1", "nl", "1"), ("*", "nl", "sterretje"), ("#", "nl", "hekje"),
    ("*", "en", "star"), ("#", "en", "hash"),
])
def test_key_phrase(key: str, language: str, spoken: str) -> None:
    assert key_phrase(key, language) == spoken


@pytest.mark.parametrize(("text", "names", "filled"), [
    ("Keep {retention.rec}.", ["retention.rec"], "Keep 3 months."),
    ("Press { yes_key } now", ["yes_key"], "Press 1 now"),
    ("Literal {{braces}}", [], "Literal {braces}"),
    ("", [], ""),
])
def test_placeholders_and_fill(text: str, names: list[str], filled: str) -> None:
    values = {"retention.rec": "3 months", "yes_key": "1"}
    assert placeholders(text) == names
    assert fill(text, values) == filled


@pytest.mark.parametrize(("text", "message"), [
    ("a { b", "unmatched '{' (write '{{' for a brace)"),
    ("a } b", "unmatched '}' (write '}}' for a brace)"),
    ("a {} b", "empty placeholder {}"),
    ("a {nope} b", "unknown placeholder {nope} (known: {yes_key})"),
])
def test_bad_placeholders(text: str, message: str) -> None:
    with pytest.raises(PlaceholderError) as err:
        placeholders(text)
        fill(text, {"yes_key": "1"})
    assert str(err.value) == message


def test_default_voice() -> None:
    assert [default_voice(x) for x in ("nl", "nl_BE", "en-GB", "sv")] == ["nl", "nl", "en", "sv"]


def test_text_prompts_lists_every_text_once_including_menus_and_language_parts() -> None:
    plan = load_dialplans([GEMEENTE], Path("/p"))
    items = text_prompts(plan.flows.values(), plan.menus.values())
    names = [str(i.stem.relative_to("/p")) for i in items]
    assert names == [
        "gemeente/language-nl", "gemeente/language-en",
        "gemeente/notice-nl", "gemeente/notice-en",
        "gemeente/recording-nl", "gemeente/recording-en",
        "gemeente/callback-nl", "gemeente/callback-en",
        "gemeente/invalid-nl", "gemeente/invalid-en",
        "gemeente/not_recorded-nl", "gemeente/not_recorded-en",
        "gemeente/more_info-nl", "gemeente/more_info-en",
        "menu.afdelingen/prompt-nl", "menu.afdelingen/prompt-en",
        "menu.afdelingen/invalid-nl", "menu.afdelingen/invalid-en",
    ]
    voices = {str(i.stem.relative_to("/p")): i.voice for i in items}
    assert voices["gemeente/language-en"] == "en" and voices["gemeente/language-nl"] == "nl"


@needs_tts
def test_build_renders_8khz_wav_skips_current_files_and_feeds_the_notice_version(
    tmp_path: Path,
) -> None:
    before = load_dialplans([MINIMAL], tmp_path).flows["minimal"]
    assert before.notice["en"].digest is None
    items = text_prompts([before])
    first = build_prompts(items, tmp_path)
    assert len(first.built) == 3 and first.skipped == ()
    for item in items:
        with wave.open(str(item.path)) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 8000, 2)
            assert w.getnframes() > 8000 * 0.5  # at least half a second of speech
    manifest = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert set(manifest) == {"minimal/notice-en.wav", "minimal/recording-en.wav",
                             "minimal/not_recorded-en.wav"}
    assert manifest["minimal/recording-en.wav"]["text"] == (
        "To allow recording, press 1. To refuse, press 2.")

    second = build_prompts(items, tmp_path)
    assert second.built == () and len(second.skipped) == 3

    after = load_dialplans([MINIMAL], tmp_path).flows["minimal"]
    assert after.notice["en"].digest == manifest["minimal/notice-en.wav"]["digest"]
    assert after.notice_version("en") != before.notice_version("en")

    # A file changed behind our back is rebuilt, and only that one.
    items[0].path.write_bytes(b"not audio")
    third = build_prompts(items, tmp_path)
    assert third.built == (items[0].path,) and len(third.skipped) == 2
    # Rendering is deterministic: the same text gives the same bytes (and version).
    assert load_dialplans([MINIMAL], tmp_path).flows["minimal"].notice_version("en") == \
        after.notice_version("en")


@needs_tts
def test_changing_retention_rebuilds_the_notice_and_changes_its_version(tmp_path: Path) -> None:
    source = tmp_path / "minimal.yaml"
    source.write_text(MINIMAL.read_text())
    prompts_dir = tmp_path / "prompts"
    flow = load_dialplans([source], prompts_dir).flows["minimal"]
    build_prompts(text_prompts([flow]), prompts_dir)
    version = load_dialplans([source], prompts_dir).flows["minimal"].notice_version("en")

    source.write_text(MINIMAL.read_text().replace("retention_days: 30", "retention_days: 90"))
    changed = load_dialplans([source], prompts_dir).flows["minimal"]
    assert "three months" in (changed.notice["en"].text or "")
    assert changed.notice["en"].digest is None  # not built for the new text yet
    result = build_prompts(text_prompts([changed]), prompts_dir)
    assert result.built == (prompts_dir / "minimal" / "notice-en.wav",)
    rebuilt = load_dialplans([source], prompts_dir).flows["minimal"]
    assert rebuilt.notice["en"].digest is not None
    assert rebuilt.notice_version("en") != version


def test_missing_tools_give_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PromptError) as err:
        tool_versions()
    assert str(err.value) == ("espeak-ng not found: install the Debian package espeak-ng "
                              "(apt-get install espeak-ng)")


def test_build_command_reports_missing_tools_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(prompts, ["build", str(MINIMAL), "--prompts-dir",
                                          str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == ("Error: espeak-ng not found: install the Debian package "
                             "espeak-ng (apt-get install espeak-ng)\n")


@needs_tts
def test_build_and_list_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [str(MINIMAL), "--prompts-dir", str(tmp_path)]
    listed = runner.invoke(prompts, ["list", *args, "--json"])
    assert [json.loads(line)["status"] for line in listed.output.splitlines()] == ["missing"] * 3
    built = runner.invoke(prompts, ["build", *args])
    assert built.exit_code == 0, built.output
    assert built.output == f"3 built, 0 up to date in {tmp_path}\n"
    again = runner.invoke(prompts, ["build", *args])
    assert again.output == f"0 built, 3 up to date in {tmp_path}\n"
    listed = runner.invoke(prompts, ["list", *args])
    assert [line.split()[0] for line in listed.output.splitlines()] == ["current"] * 3


def test_build_command_reports_config_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("flows: {}\n")
    result = CliRunner().invoke(prompts, ["build", str(bad)])
    assert result.exit_code == 1
    assert result.output == f"Error: {bad}:1:8: flows: expected at least one flow\n"
