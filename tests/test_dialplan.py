"""``dialplan check|render|schema``: the rendered Asterisk dialplan, the JSON Schema
kept in step with the parser, and a property test that no input makes ``check``
crash."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consentivr import flowfile as config_module
from consentivr.cli.dialplan import DEFAULT_PROMPTS_DIR, dialplan, prompts
from consentivr.configfile import load_settings
from consentivr.dialplan import RenderError, RenderOptions, render, render_hash, rendered_hash
from consentivr.errors import ConfigError
from consentivr.flowfile import load_dialplans, load_flow_file
from consentivr.schema import dialplan_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "dialplan" / "gemeente.yaml", ROOT / "dialplan" / "minimal.yaml"]
PROMPTS = Path(DEFAULT_PROMPTS_DIR)
PROBLEM_LINE = re.compile(r"^[^:]+:\d+:\d+: ")


@pytest.fixture(scope="module")
def plan() -> config_module.Dialplan:
    return load_dialplans(EXAMPLES, PROMPTS)


def rendered(plan: config_module.Dialplan, **options: str) -> str:
    return render(plan.flows, plan.menus, RenderOptions(**options))


def contexts(text: str) -> dict[str, list[str]]:
    """The dialplan lines of each context, without comments and blank lines."""
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            assert current not in result, f"context {current} defined twice"
            result[current] = []
            continue
        assert current is not None, line
        result[current].append(line)
    return result


_EXTEN = re.compile(r"^exten => ([^,]+),1,(\w+)\((.*)\)$")
_SAME = re.compile(r"^ same => n(?:\((\w+)\))?,(\w+)\((.*)\)$")


def check_syntax(text: str) -> dict[str, dict[str, list[tuple[str | None, str, str]]]]:
    """A small lint of the rendered file: every line is an exten/same line with
    balanced parentheses, and every label a GotoIf/Goto names exists."""
    plan: dict[str, dict[str, list[tuple[str | None, str, str]]]] = {}
    for context, lines in contexts(text).items():
        extens: dict[str, list[tuple[str | None, str, str]]] = {}
        exten = None
        for line in lines:
            assert line.count("(") == line.count(")"), line
            if m := _EXTEN.match(line):
                exten = m[1]
                assert exten not in extens, f"{context}: {exten} twice"
                extens[exten] = [(None, m[2], m[3])]
            elif m := _SAME.match(line):
                assert exten is not None, line
                extens[exten].append((m[1], m[2], m[3]))
            else:
                raise AssertionError(f"not a dialplan line: {line!r}")
        for name, steps in extens.items():
            labels = {label for label, _, _ in steps if label}
            for _, app, args in steps:
                if app == "GotoIf":
                    target = args.rsplit("?", 1)[1]
                    assert target in labels, f"{context},{name}: no label {target}"
                if app == "Goto" and args.count(",") == 1:  # Goto(exten,label or priority)
                    other, label = args.split(",")
                    assert other in extens, f"{context}: no extension {other}"
                    other_labels = {lb for lb, _, _ in extens[other] if lb}
                    assert label == "1" or label in other_labels, f"{context}: no label {args}"
            # WaitExten() falls through to the next priority on a timeout, never to t.
            for i, (_, app, _) in enumerate(steps):
                if app == "WaitExten":
                    assert steps[i + 1][1:] == ("Goto", "t,1"), f"{context},{name}: {steps}"
        plan[context] = extens
    return plan


def test_render_has_entry_flow_and_menu_contexts(plan: config_module.Dialplan) -> None:
    text = rendered(plan)
    parsed = check_syntax(text)
    assert set(parsed) == {"consentivr-entry", "consentivr-flow-gemeente",
                           "consentivr-flow-minimal", "consentivr-menu-afdelingen",
                           "consentivr-render"}
    entry = parsed["consentivr-entry"]
    assert set(entry) == {"14099", "0201234567", "101"}
    assert entry["101"][-1] == (None, "Goto", "consentivr-flow-minimal,s,1")
    menu = parsed["consentivr-menu-afdelingen"]
    assert set(menu) == {"s", "1", "2", "3", "4", "5", "i", "t"}
    assert menu["3"] == [(None, "Goto", "gemeente-afdelingen,afval,1")]
    assert ("give_up", "Goto", "gemeente-afdelingen,overig,1") in menu["t"]
    assert text == rendered(plan)  # deterministic


def test_the_flow_context_enters_stasis_then_falls_back_without_recording(
    plan: config_module.Dialplan,
) -> None:
    steps = check_syntax(rendered(plan, app="cvr"))["consentivr-flow-gemeente"]["s"]
    apps = [(label, app, args) for label, app, args in steps]
    assert apps[0] == (None, "Set", "CONSENTIVR_FLOW=gemeente")
    assert apps[1] == (None, "Stasis", "cvr,gemeente")
    # Success (the app let the call go here with its variables set): straight on.
    assert apps[2] == (None, "GotoIf", '$["${STASISSTATUS}" = "SUCCESS" & '
                                       '"${CONSENTIVR_LOGGED}" != ""]?destination')
    fallback = apps[3:-1]
    assert fallback[0] == ("fallback", "Set", "CONSENTIVR_FALLBACK=${STASISSTATUS}")
    calls = [f"{app}({args})" for _, app, args in fallback]
    assert "StopMixMonitor()" in calls
    assert "MixMonitor" not in " ".join(c for c in calls if not c.startswith("Stop"))
    assert "Set(CONSENTIVR_LOGGED=no)" in calls
    assert "Set(CONSENTIVR_DECISION_RECORDING=error)" in calls
    assert "Set(CONSENTIVR_DECISION_CALLBACK=error)" in calls
    # RECORDING=no comes after the purpose variables, so nothing can overwrite it.
    assert calls.index("Set(CONSENTIVR_RECORDING=no)") > calls.index(
        "Set(CONSENTIVR_DECISION_RECORDING=error)")
    assert calls[-1] == (f"Playback({PROMPTS}/gemeente/not_recorded-nl&"
                         f"{PROMPTS}/gemeente/not_recorded-en)")
    assert apps[-1] == ("destination", "Goto", "consentivr-menu-afdelingen,s,1")


def test_agi_mode_renders_fastagi_entries(plan: config_module.Dialplan) -> None:
    steps = check_syntax(rendered(plan, mode="agi", agi_url="agi://10.0.0.5:4573"))[
        "consentivr-flow-minimal"]["s"]
    assert steps[1] == (None, "AGI", "agi://10.0.0.5:4573/minimal,${CHANNEL(linkedid)}")
    assert "AGISTATUS" in steps[2][2]
    assert steps[-1] == ("destination", "Goto", "demo,600,1")


@pytest.mark.parametrize(("options", "message"), [
    ({"app": "bad app"}, "app name 'bad app': use letters, digits, '-' and '_'"),
    ({"mode": "sip"}, "unknown mode 'sip' (use ari or agi)"),
    ({"mode": "agi", "agi_url": "agi://x,y"}, "AGI URL 'agi://x,y': expected agi://host:port"),
])
def test_render_rejects_unsafe_options(plan: config_module.Dialplan, options: dict[str, str],
                                       message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        rendered(plan, **options)


def test_render_rejects_a_prompts_dir_the_dialplan_would_split() -> None:
    unsafe = load_dialplans(EXAMPLES[1:], Path("/srv/my prompts"))
    with pytest.raises(RenderError, match="has characters the dialplan would split on"):
        render(unsafe.flows, unsafe.menus)


def test_the_generated_sample_is_current(plan: config_module.Dialplan) -> None:
    sample = ROOT / "asterisk" / "samples" / "extensions-consentivr.generated.conf"
    expected = render(plan.flows, plan.menus, RenderOptions(),
                      ["dialplan/gemeente.yaml", "dialplan/minimal.yaml"])
    assert sample.read_text() == expected, (
        "re-run: consentivr dialplan render dialplan/gemeente.yaml dialplan/minimal.yaml "
        "-o asterisk/samples/extensions-consentivr.generated.conf")


# --- schema -------------------------------------------------------------------


def _props(schema: dict[str, Any]) -> set[str]:
    if "properties" in schema:
        return set(schema["properties"])
    return set().union(*(_props(s) for s in schema.get("oneOf", []) if isinstance(s, dict)))


@pytest.mark.parametrize(("definition", "parser_keys"), [
    ("flow", config_module.FLOW_KEYS),
    ("purpose", config_module.PURPOSE_KEYS),
    ("languageMenu", config_module.LANGUAGE_MENU_KEYS),
    ("menu", config_module.MENU_KEYS),
    ("destination", config_module.DESTINATION_KEYS),
    ("prompt", config_module.PROMPT_KEYS),
])
def test_schema_keys_match_the_parser(definition: str, parser_keys: tuple[str, ...]) -> None:
    assert _props(dialplan_schema()["$defs"][definition]) == set(parser_keys)


def test_schema_top_level_matches_the_parser() -> None:
    assert set(dialplan_schema()["properties"]) == set(config_module.FILE_KEYS)


def test_the_shipped_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "dialplan" / "dialplan.schema.json").read_text())
    assert shipped == dialplan_schema(), "re-run: consentivr dialplan schema > " \
                                         "dialplan/dialplan.schema.json"


def test_schema_command_prints_the_schema() -> None:
    result = CliRunner().invoke(dialplan, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == dialplan_schema()


def test_the_examples_validate_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = dialplan_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in EXAMPLES:
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
            yaml.safe_load(path.read_text())))
        assert errors == [], (path, [e.message for e in errors])


# --- the CLI ------------------------------------------------------------------


def test_check_accepts_the_examples() -> None:
    result = CliRunner().invoke(dialplan, ["check", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert result.output == ("OK: 2 flow(s): gemeente, minimal; 1 menu(s): afdelingen\n")


def test_check_lists_every_problem_sorted_and_exits_1(tmp_path: Path) -> None:
    text = EXAMPLES[1].read_text()
    bad = (text.replace("no_key: 2", "no_key: 1")
           .replace("    numbers:", "    colour: red\n    numbers:")
           .replace("{retention.recording}", "{retention}"))
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    result = CliRunner().invoke(dialplan, ["check", str(path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}:") for line in lines)
    numbers = [int(line.split(":")[1]) for line in lines]
    assert numbers == sorted(numbers)
    assert lines[0].endswith("flows.minimal.colour: unknown key (allowed: destination, "
                             "invalid, language_by_country, language_menu, languages, "
                             "max_menu_seconds, more_info, more_info_key, not_recorded, "
                             "notice, numbers, purposes, repeat_key)")


def test_check_with_files_and_an_explicit_config_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(dialplan, ["check", str(EXAMPLES[1]), "--config", "x.yaml"])
    assert result.exit_code == 2
    assert "give dialplan FILEs or --config, not both" in result.output


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"""\
ari: {{url: http://127.0.0.1:8088, username: u, password: p, app: myapp}}
database: {tmp_path}/c.db
recordings: {{dir: {tmp_path}/rec}}
prompts_dir: {tmp_path}/prompts
dialplan: [{EXAMPLES[0]}]
{extra}""")
    return path


def test_render_with_config_uses_its_app_and_prompts_dir(tmp_path: Path) -> None:
    out = tmp_path / "extensions-consentivr.conf"
    result = CliRunner().invoke(
        dialplan, ["render", "--config", str(_config(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    check_syntax(text)
    assert "Stasis(myapp,gemeente)" in text
    assert f"Background({tmp_path}/prompts/menu.afdelingen/prompt-nl)" in text
    assert "text prompt(s) are not built yet" in result.output  # a hint on stderr


def test_render_to_stdout_with_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(dialplan, ["render", str(EXAMPLES[1]), "--prompts-dir",
                                           str(tmp_path), "--app", "other"])
    assert result.exit_code == 0
    assert "Stasis(other,minimal)" in result.stdout
    assert f"Playback({tmp_path}/minimal/not_recorded-en)" in result.stdout


def test_check_through_the_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(dialplan, ["check", "--config", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    broken = CliRunner().invoke(dialplan, ["check", "--config",
                                           str(_config(tmp_path, "colour: red\n"))])
    assert broken.exit_code == 1
    assert len(broken.output.splitlines()) == 1
    assert broken.output.startswith(f"{tmp_path}/config.yaml:6:1: colour: unknown key "
                                    "(allowed: ami, ari, ")


# --- property: no input makes check crash -------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10, 100_000),
                    st.floats(allow_nan=True), _TEXT)
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=6)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _paths(v, (*prefix, i))
    return found


def _mutate_tree(draw: st.DrawFn, text: str) -> str:
    data = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["delete", "retype", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "retype":
            parent[path[-1]] = draw(_VALUE)
        elif isinstance(parent, dict):
            parent[draw(_TEXT)] = draw(_VALUE)
    return yaml.safe_dump(data, allow_unicode=True)


def _mutate_lines(draw: st.DrawFn, text: str) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        action = draw(st.sampled_from(["delete", "duplicate", "replace", "insert", "value"]))
        if action == "delete" and lines:
            del lines[i]
        elif action == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif action == "replace" and lines:
            lines[i] = draw(_TEXT)
        elif action == "value" and lines and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ": " + draw(_TEXT)
        else:
            lines.insert(i, " " * draw(st.integers(0, 8)) + draw(_TEXT))
    return "\n".join(lines) + "\n"


@st.composite
def dialplan_texts(draw: st.DrawFn) -> str:
    source = draw(st.sampled_from(EXAMPLES)).read_text()
    kind = draw(st.sampled_from(["tree", "lines", "random"]))
    if kind == "tree":
        return _mutate_tree(draw, source)
    if kind == "lines":
        return _mutate_lines(draw, source)
    return draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=dialplan_texts())
def test_check_never_crashes_on_mutated_yaml(text: str) -> None:
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flows.yaml"
        path.write_text(text, encoding="utf-8")
        result = runner.invoke(dialplan, ["check", str(path)])
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            result.exc_info
        assert result.exit_code in (0, 1)
        if result.exit_code == 1:
            assert result.output
            for line in result.output.splitlines():
                assert PROBLEM_LINE.match(line), line
        else:
            assert result.output.startswith("OK: ")
        # The library raises nothing but ConfigError either.
        try:
            load_flow_file(path, Path(tmp) / "prompts")
        except ConfigError as exc:
            assert exc.problems
        config = Path(tmp) / "config.yaml"
        config.write_text(f"ari: {{url: http://a, username: u, password: p}}\n"
                          f"database: {tmp}/c.db\nrecordings: {{dir: {tmp}}}\n"
                          f"dialplan: [{path}]\n")
        try:
            load_settings(config)
        except ConfigError as exc:
            assert all(PROBLEM_LINE.match(p) for p in exc.problems)


def test_the_groups_are_click_groups() -> None:
    assert isinstance(dialplan, click.Group) and isinstance(prompts, click.Group)
    assert set(dialplan.commands) == {"check", "render", "schema"}
    assert set(prompts.commands) == {"build", "list"}


def _code(line: str) -> str:
    """A config line without its comment (``\\;`` is a literal semicolon)."""
    return re.split(r"(?<!\\);", line, maxsplit=1)[0]


@pytest.mark.parametrize("name", ["extensions-consentivr.conf.sample",
                                  "extensions-consentivr.generated.conf"])
def test_samples_have_no_bare_semicolon_inside_an_application(name: str) -> None:
    # Asterisk cuts a line at a bare ';' (issue 19: "NoOp(Burgerzaken; recording=...)"
    # lost its ')' and Asterisk warned): every application's brackets must close
    # before any comment starts.
    text = (ROOT / "asterisk" / "samples" / name).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        code = _code(line)
        assert code.count("(") == code.count(")"), f"{name}:{number}: {line}"


def test_render_carries_the_hash_of_its_dialplan_lines() -> None:
    plan = config_module.load_dialplans([ROOT / "dialplan" / "gemeente.yaml"], Path("/p"))
    text = rendered(plan)
    marked = rendered_hash(text)
    assert marked is not None and marked == render_hash(text.splitlines())
    # comments and the file names it came from do not change it; a dialplan line does
    other = render(plan.flows, plan.menus, RenderOptions(), ["elsewhere/gemeente.yaml"])
    assert rendered_hash(other) == marked
    assert rendered_hash(rendered(plan, mode="agi")) != marked
