"""Table-driven tests of dialplan YAML parsing and validation: one case per error
class, each asserting the exact message and the line it is reported on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consentivr.configfile import load_settings
from consentivr.errors import ConfigError
from consentivr.flowfile import load_dialplans, load_flow_file, prompt_file
from consentivr.model import Basis, Destination, flow_context, menu_context

PROMPTS = Path("/srv/prompts")

# A valid file. Each case below edits it with one str.replace; the line the problem
# must be reported on carries the marker "# <-".
BASE = """\
version: 1
flows:
  main:
    numbers: ["100", "_0201234XXX"]
    languages: [nl, en]
    language_menu:
      prompt:
        nl: {text: "Kies {key} voor Nederlands."}
        en: {text: "Press {key} for English."}
      keys: {"1": nl, "2": en}
    notice:
      nl: {text: "We bewaren opnames {retention.recording}."}
      en: {text: "We keep recordings for {retention.recording}."}
    purposes:
      recording:
        basis: consent
        records: true
        retention_days: 90
        yes_key: 1
        no_key: 2
        question:
          nl: {text: "Toets {yes_key} voor ja, {no_key} voor nee."}
          en: {text: "Press {yes_key} for yes, {no_key} for no."}
    destination: {menu: desk}
menus:
  desk:
    prompt:
      nl: {text: "Toets 1 voor de balie."}
      en: {text: "Press 1 for the desk."}
    options:
      "1": {context: desk, exten: "200"}
"""

PURPOSE = BASE[BASE.index("      recording:"):BASE.index("    destination:")]
_PROBLEM = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<rest>.*)$")


def _marked_line(text: str) -> int:
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if "# <-" in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def problems_of(tmp_path: Path, text: str, name: str = "flows.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    try:
        load_flow_file(path, PROMPTS)
    except ConfigError as exc:
        return exc.problems
    return []


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(BASE)
    flows = load_flow_file(path, PROMPTS)
    flow = flows["main"]
    assert flow.numbers == ("100", "_0201234XXX")
    assert flow.destination == Destination(menu_context("desk"), "s", 1)
    assert flow.notice["nl"].text == "We bewaren opnames drie maanden."
    assert flow.notice["en"].text == "We keep recordings for three months."
    assert flow.purposes[0].question["en"].text == "Press 1 for yes, 2 for no."
    assert flow.language_menu is not None
    assert flow.language_menu.parts["en"].text == "Press 2 for English."
    assert flow.language_menu.prompt.media == (
        f"sound:{prompt_file(PROMPTS, 'main', 'language', 'nl')}",
        f"sound:{prompt_file(PROMPTS, 'main', 'language', 'en')}",
    )
    assert flow.notice["nl"].media == (f"sound:{PROMPTS}/main/notice-nl",)
    assert flow.notice["nl"].voice == "nl"
    # Not built yet: no digest.
    assert flow.notice["nl"].digest is None
    # The built-in fallback prompt, per language.
    assert flow.not_recorded["nl"].text == "Dit gesprek wordt niet opgenomen."


def case(old: str, new: str, path: str, message: str, name: str,
         line: int | None = None) -> object:
    """One edit of BASE and its only problem; ``line`` when the edit deletes the line."""
    return pytest.param(old, new, path, message, line, id=name)


# (old, new, dotted path, exact message). Each case has exactly one problem.
ERROR_CASES = [
    case(
        "    numbers:", "    colour: blue  # <-\n    numbers:", "flows.main.colour",
        "unknown key (allowed: destination, invalid, language_by_country, language_menu, "
        "languages, max_menu_seconds, more_info, more_info_key, not_recorded, notice, "
        "numbers, purposes, repeat_key)", name="unknown-key"),
    case(
        "        records: true\n", "        records: true\n        records: false  # <-\n",
        "flows.main.purposes.recording.records", "duplicate key (first on line 17)",
        name="duplicate-key"),
    case(
        "        no_key: 2\n", "        no_key: 1  # <-\n",
        "flows.main.purposes.recording.no_key", "key '1' is already yes_key",
        name="two-choices-on-one-key-yes-no"),
    case(
        '      keys: {"1": nl, "2": en}', '      keys: {"1": nl, "2": en, "2": nl}  # <-',
        "flows.main.language_menu.keys.2", "duplicate key (first on line 10)",
        name="two-choices-on-one-key-language-menu"),
    case(
        '      "1": {context: desk, exten: "200"}',
        '      "1": {context: desk, exten: "200"}\n      "1": {context: desk}  # <-',
        "menus.desk.options.1", "duplicate key (first on line 31)",
        name="two-choices-on-one-key-menu-option"),
    case(
        "        no_key: 2\n", "        no_key: 2\n        default: yes  # <-\n",
        "flows.main.purposes.recording.default",
        "a consent purpose cannot default to yes (privacy by default)", name="consent-default-yes"),
    case(
        '      nl: {text: "We bewaren opnames {retention.recording}."}',
        '      nl: {text: "We nemen op."}  # <-',
        "flows.main.notice.nl.text",
        "the notice does not state the retention of purpose 'recording': "
        "add {retention.recording}", name="notice-omits-retention"),
    case(
        '      en: {text: "We keep recordings for {retention.recording}."}',
        "      en: {file: nothere.wav}  # <-",
        "flows.main.notice.en.file", "sound file not found: {dir}/nothere.wav",
        name="missing-prompt-file"),
    case(
        '      en: {text: "We keep recordings for {retention.recording}."}',
        "      en: {file: nothere}  # <-",
        "flows.main.notice.en.file",
        "sound file not found: {dir}/nothere.wav (or .gsm, .ulaw, .sln...)",
        name="missing-prompt-file-no-extension"),
    case(
        '      en: {text: "We keep recordings for {retention.recording}."}\n',
        "",
        "flows.main.notice", "missing the 'en' notice (every language needs one)",
        name="language-without-notice", line=12),
    case(
        '      en: {text: "We keep recordings for {retention.recording}."}',
        '      en: {text: "We keep recordings for {retention.recordings}."}  # <-',
        "flows.main.notice.en.text",
        "unknown placeholder {retention.recordings} (known: {retention.recording})",
        name="unknown-placeholder"),
    case(
        '      en: {text: "We keep recordings for {retention.recording}."}',
        '      en: {text: "We keep {retention.recording} {here."}  # <-',
        "flows.main.notice.en.text", "unmatched '{' (write '{{' for a brace)",
        name="unmatched-brace"),
    case(
        '          en: {text: "Press {yes_key} for yes, {no_key} for no."}',
        '          en: {text: "Press {yes_key} for yes."}  # <-',
        "flows.main.purposes.recording.question.en.text",
        "the question does not say the no key: add {no_key}", name="question-omits-no-key"),
    case(
        PURPOSE,
        "      recording:\n        basis: public_task  # <-\n        retention_days: 90\n"
        "        question: {nl: beep, en: beep}\n",
        "flows.main.purposes.recording",
        "a public_task purpose needs 'object_key' (how the caller objects)",
        name="objection-without-object-key"),
    case(
        "    destination: {menu: desk}", "    destination: {menu: front}  # <-",
        "flows.main.destination.menu", "no menu named 'front' (menus: desk)",
        name="unknown-menu"),
    case(
        '      en: {text: "Press 1 for the desk."}\n', "",
        "flows.main.destination.menu", "menu 'desk' has no prompt for 'en'",
        name="menu-lacks-a-language", line=24),
    case(
        '      keys: {"1": nl, "2": en}', '      keys: {"1": nl}  # <-',
        "flows.main.language_menu.keys", "language 'en' has no key",
        name="language-without-key"),
    case(
        "    languages: [nl, en]", "    languages: [nl, en, English]  # <-",
        "flows.main.languages[2]", "expected a language code such as nl, en or en_GB",
        name="bad-language-code"),
    case(
        "        yes_key: 1\n", "        yes_key: 1\n        timeout: soon  # <-\n",
        "flows.main.purposes.recording.timeout",
        "expected a positive number of seconds (at most 3600)", name="wrong-type"),
    case(
        "    purposes:\n", "    purposes:\n      notice: {basis: consent}  # <-\n",
        "flows.main.purposes.notice", "'notice' is reserved: choose another purpose name",
        name="reserved-purpose-name"),
    case(
        "    destination: {menu: desk}", "    destination: {context: consentivr-entry}  # <-",
        "flows.main.destination.context",
        "'consentivr-entry' is a generated context: use menu: for a menu",
        name="generated-context"),
    case(
        "    destination: {menu: desk}", "    destination: {menu: desk, exten: s}  # <-",
        "flows.main.destination.exten", "give either menu or context/exten/priority",
        name="menu-and-exten"),
    case(
        '      nl: {text: "Toets 1 voor de balie."}',
        "      nl: {media: [digits:1]}  # <-",
        "menus.desk.prompt.nl",
        "the dialplan plays this with Playback(): use sounds, a file or text",
        name="menu-prompt-not-playable-by-dialplan"),
    case(
        '      nl: {text: "Toets 1 voor de balie."}',
        '      nl: {media: [beep], voice: nl}  # <-',
        "menus.desk.prompt.nl.voice", "voice goes with text (the voice that speaks it)",
        name="voice-without-text"),
    case(
        '      nl: {text: "Toets 1 voor de balie."}',
        '      nl: {media: [beep], text: "Toets 1."}  # <-',
        "menus.desk.prompt.nl", "give exactly one of media, file or text",
        name="two-kinds-of-prompt"),
    case(
        '    numbers: ["100", "_0201234XXX"]', '    numbers: ["100", "100"]  # <-',
        "flows.main.numbers[1]", "number '100' is listed twice", name="number-twice"),
    case(
        '    numbers: ["100", "_0201234XXX"]', '    numbers: ["100", "h"]  # <-',
        "flows.main.numbers[1]",
        "expected a dialled number or an Asterisk pattern such as _0201234XXX",
        name="reserved-extension-as-number"),
    case(
        "      keys:", "      timeout: 0  # <-\n      keys:",
        "flows.main.language_menu.timeout",
        "expected a positive number of seconds (at most 3600)", name="zero-timeout"),
    case(
        "        retention_days: 90", "        retention_days: 0  # <-",
        "flows.main.purposes.recording.retention_days",
        "expected a whole number from 1 to 36500", name="zero-retention"),
    # Caller help (issue 18): each key means one thing only.
    case("    destination:", "    repeat_key: 1  # <-\n    destination:", "flows.main.repeat_key",
         "key '1' is already purposes.recording.yes_key", name="repeat-key-is-an-answer"),
    case("    destination:", '    repeat_key: "2"  # <-\n    destination:',
         "flows.main.repeat_key", "key '2' is already purposes.recording.no_key",
         name="repeat-key-is-a-no"),
    case('      keys: {"1": nl, "2": en}',
         '      keys: {"1": nl, "2": en, "3": en}\n    repeat_key: 3  # <-',
         "flows.main.repeat_key", "key '3' is already language_menu.keys (language 'en')",
         name="repeat-key-is-a-language-key"),
    case("    destination:",
         "    repeat_key: 0\n    more_info_key: 0  # <-\n    more_info: {nl: beep, en: beep}\n"
         "    destination:", "flows.main.more_info_key", "key '0' is already repeat_key",
         name="more-info-key-is-the-repeat-key"),
    case("    destination:",
         "    more_info_key: 1  # <-\n    more_info: {nl: beep, en: beep}\n    destination:",
         "flows.main.more_info_key", "key '1' is already purposes.recording.yes_key",
         name="more-info-key-is-an-answer"),
    case("    destination:", "    more_info: {nl: beep, en: beep}  # <-\n    destination:",
         "flows.main.more_info", "missing 'more_info_key': the key that plays it",
         name="more-info-without-key"),
    case("    destination:", "    more_info_key: 9  # <-\n    destination:",
         "flows.main.more_info_key", "missing 'more_info': the prompt this key plays",
         name="more-info-key-without-prompt"),
    case("    destination:", "    repeat_key: 0\n    more_info_key: 9\n    more_info:\n"
         "      nl: beep  # <-\n    destination:", "flows.main.more_info",
         "missing the 'en' prompt (every language needs one)", name="more-info-per-language",
         line=0),
    case("          en: {text: \"Press {yes_key} for yes, {no_key} for no.\"}",
         "          en: {text: \"Press {repeat_key} to hear it again.\"}  # <-",
         "flows.main.purposes.recording.question.en.text",
         "unknown placeholder {repeat_key} (known: {no_key}, {retention.recording}, "
         "{yes_key})", name="repeat-key-placeholder-without-repeat-key"),
    case("    destination:", '    language_by_country: {"49": de}  # <-\n    destination:',
         "flows.main.language_by_country.49", "language 'de' is not in this flow's languages",
         name="country-language-not-in-flow"),
    case("    destination:", '    language_by_country: {"+49": nl}  # <-\n    destination:',
         "flows.main.language_by_country.+49", "expected a country calling code: 1 to 3 "
         'digits, without + or 00 (quote it: "49")', name="country-code-with-plus"),
    case("    destination:", '    language_by_country: {"4930": nl}  # <-\n    destination:',
         "flows.main.language_by_country.4930", "expected a country calling code: 1 to 3 "
         'digits, without + or 00 (quote it: "49")', name="country-code-too-long"),
    case(
        "version: 1", "version: 2  # <-", "version", "expected a whole number from 1 to 1",
        name="wrong-version"),
]


@pytest.mark.parametrize(("old", "new", "path", "message", "line"), ERROR_CASES)
def test_each_error_class_is_reported_once_on_its_line(
    tmp_path: Path, old: str, new: str, path: str, message: str, line: int | None
) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    line = line or _marked_line(text)
    found = problems_of(tmp_path, text)
    assert len(found) == 1, found
    m = _PROBLEM.match(found[0])
    assert m is not None, found[0]
    assert m["file"] == str(tmp_path / "flows.yaml")
    assert int(m["line"]) == line
    assert m["rest"] == f"{path}: {message.replace('{dir}', str(tmp_path))}"


def test_a_full_problem_line_has_file_line_column_path_and_message(tmp_path: Path) -> None:
    text = BASE.replace("        no_key: 2\n", "        no_key: 1\n")
    assert problems_of(tmp_path, text) == [
        f"{tmp_path}/flows.yaml:20:17: flows.main.purposes.recording.no_key: "
        "key '1' is already yes_key"
    ]


def test_every_problem_is_reported_sorted_by_line(tmp_path: Path) -> None:
    text = (BASE.replace("version: 1", "version: 3")
            .replace("    destination: {menu: desk}", "    destination: {menu: nope}")
            .replace("        no_key: 2", "        no_key: 1")
            .replace("    numbers:", "    colour: red\n    numbers:"))
    found = problems_of(tmp_path, text)
    lines = [int(_PROBLEM.match(p)["line"]) for p in found]  # type: ignore[index]
    assert len(found) == 4
    assert lines == sorted(lines)
    assert lines[0] == 1


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("", "1:1: the file is empty", id="empty"),
    pytest.param("flows: [",
                 "1:9: invalid YAML: expected the node content, but found '<stream end>'",
                 id="bad-yaml"),
    pytest.param("flows:\n  main: {}\n  main: {}\n",
                 "3:3: flows.main: duplicate key (first on line 2)", id="duplicate-flow"),
    pytest.param("menus: {}\n", "1:1: missing required key 'flows'", id="no-flows"),
    pytest.param("flows: {}\n", "1:8: flows: expected at least one flow", id="zero-flows"),
    pytest.param("flows:\n  bad name: {}\n",
                 "2:13: flows.bad name: flow names are letters, digits, '-' and '_'",
                 id="bad-flow-name"),
])
def test_file_level_problems(tmp_path: Path, text: str, expected: str) -> None:
    assert f"{tmp_path}/flows.yaml:{expected}" in problems_of(tmp_path, text)


def test_a_language_without_wording_needs_a_recorded_notice(tmp_path: Path) -> None:
    text = """\
flows:
  main:
    languages: [tr]
    notice: {tr: {text: "Kaydediyoruz."}}
    not_recorded: {tr: beep}
    purposes:
      recording:
        basis: consent
        retention_days: 30
        yes_key: 1
        no_key: 2
        question: {tr: beep}
    destination: {context: default}
"""
    assert problems_of(tmp_path, text) == [
        f"{tmp_path}/flows.yaml:4:25: flows.main.notice.tr.text: there is no wording for "
        "language 'tr' (known: de, en, fr, nl): use a recorded file, and a transcript "
        "without placeholders"
    ]
    (tmp_path / "notice-tr.wav").write_bytes(b"RIFF")
    ok = text.replace('{text: "Kaydediyoruz."}', "{file: notice-tr.wav}")
    assert problems_of(tmp_path, ok) == []
    # Without a built-in "not recorded" text the language needs its own.
    missing = ok.replace("    not_recorded: {tr: beep}\n", "")
    assert problems_of(tmp_path, missing) == [
        f"{tmp_path}/flows.yaml:3:5: flows.main: missing 'not_recorded' for language 'tr': "
        "there is no built-in text for it"
    ]


def test_an_objection_purpose_must_say_how_to_object(tmp_path: Path) -> None:
    purpose = """\
      statistics:
        basis: legitimate_interest
        retention_days: 365
        object_key: "*"
        question:
          nl: {text: "Toets {object_key} als u bezwaar maakt."}
          en: {text: "We count calls. Press {object_key} to object."}
"""
    text = (BASE.replace("    destination:", purpose + "    destination:")
            .replace("{retention.recording}.", "{retention.recording}, {retention.statistics}."))
    flow = load_flow_file(_write(tmp_path, text), PROMPTS)["main"]
    stats = flow.purposes[1]
    assert stats.basis is Basis.LEGITIMATE_INTEREST and stats.object_key == "*"
    assert stats.question["nl"].text == "Toets sterretje als u bezwaar maakt."
    assert stats.question["en"].text == "We count calls. Press star to object."
    assert flow.notice["en"].text == "We keep recordings for three months, one year."
    broken = text.replace("Press {object_key} to object.", "Object now.")
    assert problems_of(tmp_path, broken) == [
        f"{tmp_path}/flows.yaml:30:22: flows.main.purposes.statistics.question.en.text: "
        "the question does not say how to object: add {object_key}"
    ]


def _write(tmp_path: Path, text: str, name: str = "flows.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_recorded_notice_with_a_transcript_is_checked_and_versioned(tmp_path: Path) -> None:
    (tmp_path / "notice-en.gsm").write_bytes(b"one")
    text = BASE.replace(
        '      en: {text: "We keep recordings for {retention.recording}."}',
        '      en: {file: notice-en, transcript: "We keep recordings {retention.recording}."}')
    flow = load_flow_file(_write(tmp_path, text), PROMPTS)["main"]
    notice = flow.notice["en"]
    assert notice.media == (f"sound:{tmp_path}/notice-en",)
    assert notice.text == "We keep recordings three months."
    before = flow.notice_version("en")
    (tmp_path / "notice-en.gsm").write_bytes(b"two")  # the admin re-records the notice
    again = load_flow_file(_write(tmp_path, text), PROMPTS)["main"]
    assert again.notice_version("en") != before
    assert problems_of(tmp_path, text.replace('"We keep recordings {retention.recording}."',
                                              '"We keep recordings."')) == [
        f"{tmp_path}/flows.yaml:13:41: flows.main.notice.en.transcript: the notice does not "
        "state the retention of purpose 'recording': add {retention.recording}"
    ]


def test_retention_days_changes_the_spoken_text_and_the_notice_version(tmp_path: Path) -> None:
    flow = load_flow_file(_write(tmp_path, BASE), PROMPTS)["main"]
    longer = BASE.replace("retention_days: 90", "retention_days: 730")
    flow2 = load_flow_file(_write(tmp_path, longer), PROMPTS)["main"]
    assert flow2.notice["nl"].text == "We bewaren opnames twee jaar."
    assert flow2.purposes[0].retention_days == 730  # what purge enforces
    assert flow2.notice_version("nl") != flow.notice_version("nl")


def test_flows_and_numbers_are_unique_across_files(tmp_path: Path) -> None:
    first = _write(tmp_path, BASE, "a.yaml")
    other = BASE.replace("  main:", "  second:").replace("  desk:", "  desk2:").replace(
        "{menu: desk}", "{menu: desk2}").replace('"_0201234XXX"', '"200"')
    second = _write(tmp_path, other, "b.yaml")
    with pytest.raises(ConfigError) as err:
        load_dialplans([first, second], PROMPTS)
    assert err.value.problems == [
        f"{second}:4:15: flows.second.numbers[0]: number '100' already selects flow 'main'"
    ]
    third = _write(tmp_path, BASE, "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_dialplans([first, third], PROMPTS)
    assert err.value.problems[:2] == [
        f"{third}:3:3: flows.main: flow 'main' is already defined at {first}:3",
        f"{third}:26:3: menus.desk: menu 'desk' is already defined at {first}:26",
    ]


def test_load_settings_reads_dialplan_files_and_their_menus(tmp_path: Path) -> None:
    _write(tmp_path, BASE, "flows.yaml")
    config = _write(tmp_path, f"""\
ari: {{url: http://127.0.0.1:8088, username: u, password: p}}
database: {tmp_path}/c.db
recordings: {{dir: {tmp_path}/rec}}
prompts_dir: prompts
dialplan: [flows.yaml]
""", "config.yaml")
    settings = load_settings(config)
    assert list(settings.flows) == ["main"]
    assert list(settings.menus) == ["desk"]
    assert settings.prompts_dir == tmp_path / "prompts"
    assert settings.flows["main"].notice["nl"].media == (
        f"sound:{tmp_path}/prompts/main/notice-nl",)
    assert flow_context("main") == "consentivr-flow-main"


def test_load_settings_reports_problems_of_config_and_dialplan_files(tmp_path: Path) -> None:
    _write(tmp_path, BASE.replace("no_key: 2", "no_key: 1"), "flows.yaml")
    config = _write(tmp_path, f"""\
ari: {{url: http://127.0.0.1:8088, username: u, password: p}}
database: {tmp_path}/c.db
recordings: {{dir: {tmp_path}/rec}}
colour: red
dialplan: [flows.yaml]
""", "config.yaml")
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert [p.split(": ", 1)[0].rsplit("/", 1)[1] for p in err.value.problems] == [
        "config.yaml:4:1", "flows.yaml:20:17"]


def test_the_example_files_load(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "dialplan"
    plan = load_dialplans([root / "gemeente.yaml", root / "minimal.yaml"], PROMPTS)
    gemeente = plan.flows["gemeente"]
    assert gemeente.languages == ("nl", "en")
    assert [p.name for p in gemeente.purposes] == ["recording", "callback"]
    assert all(p.basis is Basis.CONSENT for p in gemeente.purposes)
    assert gemeente.recording_purpose and gemeente.recording_purpose.retention_days == 90
    assert gemeente.callback_purpose and gemeente.callback_purpose.name == "callback"
    assert "drie maanden" in (gemeente.notice["nl"].text or "")
    assert "three months" in (gemeente.notice["en"].text or "")
    assert len(plan.menus["afdelingen"].options) == 5
    assert gemeente.destination == Destination(menu_context("afdelingen"))
    assert plan.flows["minimal"].languages == ("en",)


def test_a_single_language_menu_prompt_can_name_each_key(tmp_path: Path) -> None:
    text = BASE.replace(
        '''      prompt:
        nl: {text: "Kies {key} voor Nederlands."}
        en: {text: "Press {key} for English."}''',
        '''      prompt: {text: "Kies {key.nl} voor Nederlands, of {key.en} voor Engels."}''')
    menu = load_flow_file(_write(tmp_path, text), PROMPTS)["main"].language_menu
    assert menu is not None and menu.parts == {}
    assert menu.prompt.text == "Kies 1 voor Nederlands, of 2 voor Engels."
    assert menu.prompt.voice == "nl"  # the first language speaks it
    assert menu.prompt.media == (f"sound:{prompt_file(PROMPTS, 'main', 'language', 'nl')}",)


def test_caller_help_keys_are_parsed_said_and_versioned(tmp_path: Path) -> None:
    text = BASE.replace("    destination:", """\
    repeat_key: 0
    more_info_key: "*"
    language_by_country: {"44": en, 1: en}
    more_info:
      nl: {text: "Meer uitleg. Toets {repeat_key} om alles opnieuw te horen."}
      en: {text: "More information. Press {repeat_key} to hear it all again."}
    destination:""", 1).replace(
        'en: {text: "Press {yes_key} for yes, {no_key} for no."}',
        'en: {text: "Press {yes_key} for yes, {no_key} for no, {more_info_key} for more."}')
    flow = load_flow_file(_write(tmp_path, text), PROMPTS)["main"]
    base = load_flow_file(_write(tmp_path, BASE, "base.yaml"), PROMPTS)["main"]
    assert (flow.repeat_key, flow.more_info_key) == ("0", "*")
    assert flow.language_by_country == {"44": "en", "1": "en"}
    assert flow.more_info["nl"].text == "Meer uitleg. Toets 0 om alles opnieuw te horen."
    assert flow.more_info["en"].media == (f"sound:{PROMPTS}/main/more_info-en",)
    assert flow.purposes[0].question["en"].text == "Press 1 for yes, 2 for no, star for more."
    assert flow.notice_version("nl") != base.notice_version("nl")
    assert base.repeat_key is None and base.more_info == {}


def test_more_info_is_a_reserved_purpose_name(tmp_path: Path) -> None:
    text = BASE.replace("      recording:", "      more_info:", 1)
    assert any("'more_info' is reserved" in p for p in problems_of(tmp_path, text))
