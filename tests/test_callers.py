"""Caller numbers normalised to E.164 (issue 12): intake, the log, lookups, callbacks."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.callers import WITHHELD, normalise, spellings
from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.errors import ConfigError
from consentivr.store import CallerKey
from consentivr.subject import callback_list, export_subject
from tests.rights_fixtures import DAY, KEY, T0, Env, record

E164 = "+31611110002"

# What real trunks send for one Dutch mobile number, and what is not a number at all.
SPELLINGS = [
    ("0611110002", "NL", E164),
    ("+31611110002", "NL", E164),
    ("0031611110002", "NL", E164),
    ("06-1111 0002", "NL", E164),
    ("+31 6 1111 0002", "NL", E164),
    ("(06) 1111-0002", "NL", E164),
    ("+31 (0)6 1111 0002", "NL", E164),
    ("020 123 4567", "NL", "+31201234567"),
    ("+1 212 555 0100", "NL", "+12125550100"),
    ("+31611110002", None, E164),  # international needs no region
    ("tel:+31611110002", None, E164),
]
NOT_NUMBERS = [
    # (text, kind)
    ("anonymous", "withheld"),
    ("Anonymous", "withheld"),
    ("restricted", "withheld"),
    ("unknown", "withheld"),
    ("", "withheld"),
    (None, "withheld"),
    ("garbage", "unparseable"),
    ('=HYPERLINK("http://evil","x")', "unparseable"),
    ("@SUM(1+1)", "unparseable"),
    ("-2+3", "unparseable"),
    ("+31200000001\r+31699999999", "unparseable"),
    ("\x1b[31m+31611110002", "unparseable"),
    ("0800-FLOWERS", "unparseable"),  # letters are never read as digits
    ("12", "unparseable"),
    ("0611110002", "unparseable"),  # national, with no region to read it by
]


@pytest.mark.parametrize(("raw", "region", "e164"), SPELLINGS)
def test_real_trunk_spellings_normalise_to_e164(raw: str, region: str | None,
                                                e164: str) -> None:
    caller = normalise(raw, region)
    assert caller.kind == "e164" and caller.e164 == e164


@pytest.mark.parametrize(("raw", "kind"), NOT_NUMBERS)
def test_withheld_and_garbage_are_marked_never_a_number(raw: str | None, kind: str) -> None:
    region = None if raw == "0611110002" else "NL"
    caller = normalise(raw, region)
    assert caller.kind == kind and caller.e164 is None


def _raw_hash(text: str) -> str:
    return hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()


def test_the_log_keeps_e164_for_a_callback_and_marks_the_rest(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.key = CallerKey(KEY, region="NL")
    env.add(record(1, caller="06-1111 0002", callback=True),
            record(2, caller="anonymous", callback=True),
            record(3, caller='=HYPERLINK("http://evil","x")', callback=True),
            record(4, caller="0031611110002"))
    rows = env.query("SELECT caller_hash, caller_number FROM calls ORDER BY seq")
    assert rows[0]["caller_number"] == E164
    assert rows[0]["caller_hash"] == _raw_hash(E164) == rows[3]["caller_hash"]
    assert rows[1]["caller_number"] is None and rows[1]["caller_hash"] == WITHHELD
    assert rows[2]["caller_number"] is None
    assert rows[2]["caller_hash"].startswith("unparseable:")
    assert "HYPERLINK" not in rows[2]["caller_hash"]
    conn = env.conn()
    try:
        numbers = [r["number"] for r in callback_list(conn, {}, T0, region="NL")]
    finally:
        conn.close()
    assert numbers == [E164]


def test_a_row_stored_national_is_found_by_an_international_spelling(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.config.write_text(env.config.read_text() + "callers:\n  default_region: NL\n")
    env.key = CallerKey(KEY, region="NL")
    env.call(caller="0611110002")  # 1: a new row, hashed from E.164
    env.call(caller="+31209999999")  # 2: someone else
    # 3, 4: rows written before this change: the HMAC of whatever the trunk sent.
    env.call(caller="+31209999998")
    env.call(caller="+31209999997", callback=True)
    conn = env.conn()
    try:
        conn.execute("UPDATE calls SET caller_hash=? WHERE seq=3", (_raw_hash("0611110002"),))
        conn.execute("UPDATE calls SET caller_hash=?, caller_number=? WHERE seq=4",
                     (_raw_hash("0031611110002"), "0031611110002"))
        found = export_subject(conn, env.rec, env.key, "+31 6 1111 0002", None).rows
    finally:
        conn.close()
    assert [r["seq"] for r in found] == [1, 3, 4]
    result = CliRunner().invoke(main, ["subject", "export", "--config", str(env.config),
                                       "--caller", "06-1111 0002"])
    assert result.exit_code == 0, result.output
    assert [r["seq"] for r in json.loads(result.output)["rows"]] == [1, 3, 4]
    listed = CliRunner().invoke(main, ["calls", "list", "--config", str(env.config),
                                       "--caller", "+31 6 1111 0002", "--json"])
    assert listed.exit_code == 0, listed.output
    assert sorted(json.loads(line)["seq"] for line in listed.output.splitlines()) == [1, 3, 4]
    # The old clear number is exported in E.164, once.
    out = CliRunner().invoke(main, ["callbacks", "export", "--by", "test", "--config",
                                    str(env.config), "--as-of", "2025-06-16", "--format", "json"])
    assert out.exit_code == 0, out.output
    assert [r["number"] for r in json.loads(out.output)] == [E164]


@pytest.mark.parametrize(("value", "message"), [
    ("XX", "expected an ISO 3166 region code"),
    ("Netherlands", "expected an ISO 3166 region code"),
    ("[NL]", "expected text"),
])
def test_default_region_is_checked_with_its_position(tmp_path: Path, value: str,
                                                     message: str) -> None:
    env = Env(tmp_path)
    env.config.write_text(env.config.read_text() + f"callers:\n  default_region: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env.config)
    line = len(env.config.read_text().splitlines())
    assert any(p.startswith(f"{env.config}:{line}:19: callers.default_region: {message}")
               for p in info.value.problems), info.value.problems


def test_default_region_is_read(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.config.write_text(env.config.read_text() + "callers:\n  default_region: nl\n")
    assert load_settings(env.config).callers.default_region == "NL"
    env.config.write_text(env.config.read_text().replace("callers:\n  default_region: nl\n",
                                                         ""))
    assert load_settings(env.config).callers.default_region is None


def test_lookup_spellings_cover_the_old_raw_forms() -> None:
    forms = set(spellings("+31 6 1111 0002", "NL"))
    assert {E164, "0611110002", "0031611110002", "+31 6 1111 0002",
            "+31611110002"} <= forms


def test_callback_list_drops_numbers_said_no_later_in_any_spelling(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.key = CallerKey(KEY, region="NL")
    env.add(record(1, caller="0611110002", callback=True),
            record(2, caller="+31 6 1111 0002", decided_at=T0 + DAY))  # later: no
    conn = env.conn()
    try:
        assert callback_list(conn, load_settings(env.config).flows, T0 + DAY,
                             region="NL") == []
    finally:
        conn.close()
