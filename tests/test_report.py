"""``consentivr report``: every figure against the log itself, the page, the browser.

The log is seeded through the real code: rows through GroupCommitter/ConsentLog,
recording times and withdrawals through RecordingLog/apply_withdrawal, a purge
through run_purge, an erasure and an access request through subject.py. Each
figure of the JSON is then checked against a count taken straight from the
database with SQL of the test's own, and the HTML against the JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.errors import ConfigError
from consentivr.flow import DecisionRecord, KeyPress
from consentivr.logstats import Period, SqliteLogStats
from consentivr.model import Decision
from consentivr.report import gather
from consentivr.reportpage import render_html
from consentivr.retention import PurgeOptions, run_purge
from consentivr.store import CallerKey, ConsentLog, GroupCommitter, open_database, parse_iso
from consentivr.subject import erase_subject, export_subject
from consentivr.withdrawal import RecordingLog, apply_withdrawal

DAY = 86400.0
KEY = b"test-key"

CONFIG = """\
ari: {{url: "http://127.0.0.1:8088", username: t, password: t}}
database: {root}/consent.db
recordings: {{dir: {root}/rec}}
caller_key: test-key
log_retention_days: 365
controller: {{name: Example Ltd, email: privacy@example.test}}
dpo: {{name: Dee Peo, phone: "+31 20 555 0000"}}
flows:
  main:
    languages: [nl, en]
    notice:
      nl: {{media: [sound:conf-now-recording]}}
      en: {{media: [sound:conf-now-recording]}}
    purposes:
      recording:
        basis: consent
        records: true
        retention_days: 90
        yes_key: "1"
        no_key: "2"
        question: {{nl: {{media: [sound:vm-press]}}, en: {{media: [sound:vm-press]}}}}
      callback:
        basis: consent
        callback: true
        retention_days: 30
        yes_key: "1"
        no_key: "2"
        question: {{nl: {{media: [sound:vm-press]}}, en: {{media: [sound:vm-press]}}}}
    destination: {{context: from-internal}}
  info:
    languages: [en]
    notice: {{en: {{media: [sound:hello-world]}}}}
    purposes:
      survey:
        basis: legitimate_interest
        retention_days: 60
        object_key: "9"
        question: {{en: {{media: [sound:vm-press]}}}}
    destination: {{context: from-internal}}
"""

# (flow, decisions) cycled over the seeded calls: every decision value occurs.
PATTERNS = [
    ("main", {"recording": "yes", "callback": "yes"}),
    ("main", {"recording": "yes", "callback": "no"}),
    ("main", {"recording": "no", "callback": "no"}),
    ("main", {"recording": "no_answer", "callback": "no_answer"}),
    ("main", {"recording": "yes", "callback": "no_answer"}),
    ("main", {"recording": "abandoned", "callback": "abandoned"}),
    ("main", {"recording": "error", "callback": "error"}),
    ("info", {"survey": "not_objected"}),
    ("info", {"survey": "objected"}),
    ("main", {"recording": "yes", "callback": "no"}),
    ("info", {"survey": "not_objected"}),
]


@dataclass
class Seeded:
    root: Path
    config: Path
    db: Path
    rec: Path
    now: float
    numbers: list[str]
    call_ids: list[str]


def _number(n: int) -> str:
    return f"+3161234{n:04d}"


def seed(root: Path, calls: int = 77) -> Seeded:
    """``calls`` calls over ~10 weeks, through the real writers."""
    rec = root / "rec"
    rec.mkdir(mode=0o700)
    config = root / "config.yaml"
    config.write_text(CONFIG.format(root=root))
    settings = load_settings(config)
    db = settings.database
    now = time.time()
    records = []
    for n in range(calls):
        flow_name, decisions = PATTERNS[n % len(PATTERNS)]
        flow = settings.flows[flow_name]
        lang = flow.languages[n % len(flow.languages)]
        decided = now - 70 * DAY + n * (70 * DAY / calls)
        recorded = decisions.get("recording") == "yes"
        path = str(rec / f"call{n:03d}.wav") if recorded else None
        if path:
            Path(path).write_bytes(b"RIFF" + b"\0" * 40)
        records.append(DecisionRecord(
            call_id=f"call{n:03d}-{os.urandom(4).hex()}", channel_id=f"1700000000.{n}",
            linkedid=f"1700000000.{n}", channel_name=f"PJSIP/trunk-{n:04x}",
            caller=_number(n % 50), flow=flow_name, language=lang,
            notice_version=flow.notice_version(lang), started_at=decided - 30,
            decided_at=decided, keys=(KeyPress("1", decided - 2, "recording"),),
            decisions={k: Decision(v) for k, v in decisions.items()},
            retention_until={p.name: decided + p.retention_days * DAY for p in flow.purposes},
            recording_path=path, outcome="completed",
            # A few recordings are already past their 90 days by this clock: the
            # purge below must take them.
            recording_until=(decided + (20 if n < 15 else 90) * DAY) if path else None,
            callback_until=decided + 30 * DAY if decisions.get("callback") == "yes" else None,
        ))
    key = CallerKey(KEY)
    writer = GroupCommitter(lambda: ConsentLog(db, key))
    try:
        futures = [writer.submit("append", r) for r in records]
        for fut in futures:
            fut.result(timeout=30)
        marks = [writer.submit("mark_recording", (r.call_id, True, None, r.decided_at + 1))
                 for r in records if r.recording_path]
        for fut in marks:
            fut.result(timeout=30)
    finally:
        writer.close()
    recorded = [r for r in records if r.recording_path]
    with RecordingLog(db) as rl:
        for i, r in enumerate(recorded):
            rl.recording_started(r.channel_id, r.decided_at + 10)
            if i % 5:  # every fifth has no logged stop: its hours are unknown
                rl.recording_stopped(r.channel_id, r.decided_at + 10 + 60 * (i + 1))
        for i, r in enumerate(recorded[-9:]):
            apply_withdrawal(rl, rec, r.call_id, "caller" if i % 3 else "agent",
                             r.started_at + 40 + 17 * i, "delete")
    run_purge(db, rec, PurgeOptions(as_of=now, log_retention_days=365, grace=0))
    run_purge(db, rec, PurgeOptions(as_of=now, log_retention_days=365, dry_run=True))
    conn = open_database(db)
    try:
        export_subject(conn, rec, key, _number(3), None)
    finally:
        conn.close()
    erase_subject(db, rec, key, _number(4), grace=0)
    return Seeded(root, config, db, rec, now, [_number(i) for i in range(50)],
                  [r.call_id for r in records])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    return seed(tmp_path_factory.mktemp("report"))


def report_json(s: Seeded, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["report", "--config", str(s.config), "--format", "json",
                                       *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def report_html(s: Seeded, lang: str = "en", *args: str) -> str:
    out = s.root / f"report-{lang}.html"
    result = CliRunner().invoke(main, ["report", "--config", str(s.config), "--lang", lang,
                                       "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out.read_text()


def sql(s: Seeded, query: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(s.db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def iso_week(text: str) -> str:
    y, w, _ = datetime.fromisoformat(text[:10]).isocalendar()
    return f"{y}-W{w:02d}"


# --- the JSON against the log ---------------------------------------------------------


def test_decision_counts_shares_and_weeks_equal_the_log(seeded: Seeded) -> None:
    data = report_json(seeded)
    assert data["calls"] == sql(seeded, "SELECT count(*) FROM calls")[0][0] == 77
    rows = sql(seeded, "SELECT flow, decisions, decided_at FROM calls")
    overall: Counter[tuple[str, str, str]] = Counter()
    weekly: Counter[tuple[str, str, str, str]] = Counter()
    for flow, decisions, decided_at in rows:
        for purpose, decision in json.loads(decisions).items():
            overall[(flow, purpose, decision)] += 1
            weekly[(flow, purpose, iso_week(decided_at), decision)] += 1
    seen = set()
    for p in data["purposes"]:
        total = sql(seeded, "SELECT count(*) FROM calls WHERE flow = ? AND "
                    "json_extract(decisions, '$.' || ?) IS NOT NULL", p["flow"], p["purpose"])
        assert p["total"] == total[0][0]
        for decision, n in p["counts"].items():
            assert n == overall[(p["flow"], p["purpose"], decision)], (p["purpose"], decision)
            assert p["shares"][decision] == pytest.approx(n / p["total"], abs=1e-4)
            seen.add((p["flow"], p["purpose"], decision)) if n else None
        for w in p["weeks"]:
            for decision, n in w["counts"].items():
                assert n == weekly[(p["flow"], p["purpose"], w["week"], decision)]
        assert sum(sum(w["counts"].values()) for w in p["weeks"]) == p["total"]
    assert seen == set(overall)  # nothing left out
    decisions = {d for (_, _, d) in overall}
    assert decisions == {"yes", "no", "no_answer", "abandoned", "error", "objected",
                         "not_objected"}


def test_withdrawals_recordings_and_requests_equal_the_log(seeded: Seeded) -> None:
    data = report_json(seeded)
    by = {w["by"]: w for w in data["withdrawals"]["by"]}
    for who in ("caller", "agent"):
        rows = sql(seeded, "SELECT started_at, withdrawn_at FROM calls WHERE withdrawn_by = ?",
                   who)
        assert by[who]["count"] == len(rows) > 0
        median = statistics.median(parse_iso(b) - parse_iso(a) for a, b in rows)
        assert by[who]["median_seconds"] == pytest.approx(median, abs=0.1)
    assert data["withdrawals"]["total"] == sql(
        seeded, "SELECT count(*) FROM calls WHERE withdrawn_at IS NOT NULL")[0][0]

    rows = sql(seeded, "SELECT recording_started_at, recording_stopped_at FROM calls "
                       "WHERE recording_confirmed = 1")
    seconds = sum(parse_iso(b) - parse_iso(a) for a, b in rows if a and b)
    assert data["recordings"]["count"] == len(rows) > 0
    assert data["recordings"]["hours"] == pytest.approx(seconds / 3600, abs=0.01)
    assert data["recordings"]["without_duration"] == sum(1 for a, b in rows if not (a and b))

    assert data["requests"] == {
        "access": sql(seeded, "SELECT count(*) FROM subject_requests WHERE kind='access'")[0][0],
        "erasure": sql(seeded, "SELECT count(*) FROM purge_runs WHERE kind='erase'")[0][0],
    }
    assert data["requests"] == {"access": 1, "erasure": 1}


def test_retention_purges_notices_and_chain_equal_the_log(seeded: Seeded) -> None:
    data = report_json(seeded)
    r = data["retention"]
    held = sql(seeded, "SELECT recording_path, recording_until FROM calls WHERE "
                       "recording_path IS NOT NULL AND recording_purged_at IS NULL")
    on_disk = [(p, u) for p, u in held if Path(p).is_file()]
    assert r["held"] == len(on_disk) > 0
    assert r["missing"] == len(held) - len(on_disk)
    assert r["past_retention"] == 0  # the purge took the 20-day ones
    assert r["oldest"]["deadline"] == min(u for _, u in on_disk)

    runs = sql(seeded, "SELECT count(*), sum(recordings_deleted), sum(rows_redacted) "
                       "FROM purge_runs WHERE kind='purge' AND dry_run=0")[0]
    p = data["purges"]
    assert p["run_count"] == sql(seeded, "SELECT count(*) FROM purge_runs "
                                         "WHERE kind='purge'")[0][0] == 2
    assert p["recordings_deleted"] == runs[1] > 0
    assert p["rows_redacted"] == runs[2]
    assert p["last_success"] == sql(seeded, "SELECT max(finished_at) FROM purge_runs WHERE "
                                            "kind='purge' AND dry_run=0 AND status='done'")[0][0]

    uses = {(f, lang, v): (n, a, b) for f, lang, v, n, a, b in sql(
        seeded, "SELECT flow, language, notice_version, count(*), min(decided_at), "
                "max(decided_at) FROM calls GROUP BY 1, 2, 3")}
    assert {(n["flow"], n["language"], n["version"]): (n["calls"], n["first"], n["last"])
            for n in data["notices"]} == uses
    assert all(n["current"] and n["parts"] for n in data["notices"])

    assert data["chain"]["ok"] is True
    assert data["chain"]["rows"] == sql(seeded, "SELECT count(*) FROM calls")[0][0]
    assert data["chain"]["head_hash"] == sql(
        seeded, "SELECT row_hash FROM calls ORDER BY seq DESC LIMIT 1")[0][0]

    a = data["art30"]
    assert a["controller"] == {"name": "Example Ltd", "email": "privacy@example.test"}
    assert a["dpo"] == {"name": "Dee Peo", "phone": "+31 20 555 0000"}
    assert [(x["flow"], x["purpose"], x["basis"], x["retention_days"]) for x in a["purposes"]] \
        == [("main", "recording", "consent", 90), ("main", "callback", "consent", 30),
            ("info", "survey", "legitimate_interest", 60)]


def test_the_period_selects_calls_by_decision_time(seeded: Seeded) -> None:
    first = datetime.fromtimestamp(seeded.now - 40 * DAY, UTC).date().isoformat()
    last = datetime.fromtimestamp(seeded.now - 20 * DAY, UTC).date().isoformat()
    data = report_json(seeded, "--from", first, "--to", last)
    expected = sql(seeded, "SELECT count(*) FROM calls WHERE substr(decided_at, 1, 10) "
                           "BETWEEN ? AND ?", first, last)[0][0]
    assert 0 < data["calls"] == expected < 77
    assert sum(p["total"] for p in data["purposes"] if p["purpose"] in ("recording", "survey")) \
        == expected


# --- the page ---------------------------------------------------------------------------


def figures(html: str) -> dict[str, str]:
    return dict(re.findall(r'data-figure="([^"]+)" data-value="([^"]*)"', html))


@pytest.mark.parametrize("lang", ["en", "nl"])
def test_the_page_shows_the_same_figures_as_the_json(seeded: Seeded, lang: str) -> None:
    data = report_json(seeded)
    html = report_html(seeded, lang)
    assert figures(html) == {
        "calls": str(data["calls"]), "recordings": str(data["recordings"]["count"]),
        "hours": str(data["recordings"]["hours"]),
        "withdrawals": str(data["withdrawals"]["total"]),
        "past-retention": "0", "chain": "ok",
    }
    for p in data["purposes"]:
        table = re.search(rf'<table class="counts" data-flow="{p["flow"]}" '
                          rf'data-purpose="{p["purpose"]}">(.*?)</table>', html, re.S)
        assert table, p["purpose"]
        cells = dict(re.findall(r'data-decision="([^"]+)" data-value="(\d+)"', table[1]))
        assert cells.pop("total") == str(p["total"])
        assert {d: int(n) for d, n in cells.items()} == \
            {d: n for d, n in p["counts"].items() if d in cells}
        assert all(n == 0 for d, n in p["counts"].items() if d not in cells)
    for w in data["withdrawals"]["by"]:
        assert f'data-withdrawn-by="{w["by"]}" data-value="{w["count"]}"' in html
    for kind, n in data["requests"].items():
        assert f'data-request="{kind}" data-value="{n}"' in html
    # Charts: one stacked weekly chart per flow and purpose, one of the purges.
    assert html.count('data-chart="weeks"') == len(data["purposes"]) == 3
    assert html.count('data-chart="purges"') == 1
    assert html.count("<svg") == 4
    assert 'id="banner-retention"' not in html
    title = {"en": "consent and retention report", "nl": "toestemming en bewaartermijnen"}
    assert title[lang] in html and f'<html lang="{lang}">' in html


def test_the_page_and_the_json_hold_no_personal_data(seeded: Seeded) -> None:
    texts = [report_html(seeded, "en"), report_html(seeded, "nl"),
             json.dumps(report_json(seeded))]
    hashes = [h for (h,) in sql(seeded, "SELECT caller_hash FROM calls "
                                        "WHERE caller_hash IS NOT NULL")]
    secrets = [*seeded.numbers, *seeded.call_ids, *hashes, str(seeded.rec),
               "PJSIP/trunk", "1700000000."]
    for text in texts:
        leaked = [s for s in secrets if s in text]
        assert not leaked, leaked[:3]


def test_the_page_is_self_contained(seeded: Seeded) -> None:
    html = report_html(seeded)
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\((?!#)", html, re.I)
    assert not re.search(r'(?:src|href)\s*=\s*"(?!#)', html)


def test_a_recording_past_retention_shows_the_red_banner(tmp_path: Path) -> None:
    s = seed(tmp_path)
    # Two recordings past their deadline still on disk (the purge did not run since).
    late = sql(s, "SELECT seq, recording_path FROM calls WHERE recording_path IS NOT NULL "
                  "AND recording_purged_at IS NULL ORDER BY seq LIMIT 2")
    assert len(late) == 2 and all(Path(p).is_file() for _, p in late)
    conn = sqlite3.connect(s.db)
    with conn:
        conn.executemany("UPDATE calls SET recording_until = '2020-01-01T00:00:00.000000Z' "
                         "WHERE seq = ?", [(seq,) for seq, _ in late])
    conn.close()
    for lang, words in (("en", "2 recording(s) are past their retention"),
                        ("nl", "2 opname(n) zijn over hun bewaartermijn")):
        out = tmp_path / f"late-{lang}.html"
        result = CliRunner().invoke(main, ["report", "--config", str(s.config), "--lang",
                                           lang, "--out", str(out)])
        assert result.exit_code == 3  # written, and it needs a person
        assert "2 recording(s) past retention" in result.output
        html = out.read_text()
        banner = re.search(r'<div class="banner red" role="alert" id="banner-retention" '
                           r'data-value="(\d+)">(.*?)</div>', html, re.S)
        assert banner and banner[1] == "2" and words in banner[2]
        assert figures(html)["past-retention"] == "2"
    # A file that is gone is missing, not past retention: the banner counts files.
    Path(late[0][1]).unlink()
    data = json.loads(CliRunner().invoke(main, ["report", "--config", str(s.config),
                                                "--format", "json"]).stdout)
    assert data["retention"]["past_retention"] == 1
    assert data["retention"]["missing"] >= 1


def test_a_broken_chain_is_reported_without_its_call_id(tmp_path: Path) -> None:
    s = seed(tmp_path, calls=11)
    conn = sqlite3.connect(s.db)
    with conn:
        conn.execute("UPDATE calls SET outcome = 'edited' WHERE seq = 5")
    conn.close()
    result = CliRunner().invoke(main, ["report", "--config", str(s.config), "--format",
                                       "json"])
    assert result.exit_code == 3 and "hash chain is broken" in result.output
    data = json.loads(result.stdout)
    assert data["chain"]["ok"] is False and data["chain"]["bad_seq"] == 5
    assert "bad_call_id" not in data["chain"]
    stats = SqliteLogStats(s.db)
    try:
        report = gather(stats, load_settings(s.config), Period(), now=time.time())
    finally:
        stats.close()
    html = render_html(report, "en")
    assert 'id="banner-chain"' in html
    assert not any(c in html for c in s.call_ids)


# --- the CLI's errors and the config keys ---------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "yesterday"], "--from 'yesterday': expected a date like 2026-03-31"),
    (["--to", "2026-13-01"], "--to '2026-13-01': expected a date"),
    (["--from", "2026-03-01", "--to", "2026-02-01"], "--from 2026-03-01 is not before --to"),
    (["--out", "/nonexistent-dir/r.html"], "the directory /nonexistent-dir does not exist"),
])
def test_bad_options_are_one_line_errors(seeded: Seeded, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["report", "--config", str(seeded.config), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


def test_no_log_yet_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    result = CliRunner().invoke(main, ["report", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path}/consent.db: no consent log here " \
                                    "(no calls so far?)"


@pytest.mark.parametrize(("snippet", "problem"), [
    ("controller: {name: X, fax: 1}\n", "controller.fax: unknown key (allowed: address, "
                                        "email, name, phone)"),
    ("dpo: {email: a@b.test}\n", "dpo: missing required key 'name'"),
    ("dpo: Jan\n", "dpo: expected a mapping"),
    ("controller: {name: [a, b]}\n", "controller.name: expected text"),
])
def test_controller_and_dpo_config_errors_are_positioned(tmp_path: Path, snippet: str,
                                                         problem: str) -> None:
    config = tmp_path / "config.yaml"
    text = CONFIG.format(root=tmp_path).replace("controller: {name: Example Ltd, email: "
                                                "privacy@example.test}\n", "")
    text = text.replace('dpo: {name: Dee Peo, phone: "+31 20 555 0000"}\n', "") + snippet
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    line = len(text.splitlines())
    assert any(re.fullmatch(rf"{re.escape(str(config))}:{line}:\d+: {re.escape(problem)}.*", p)
               for p in err.value.problems), err.value.problems


# --- a real browser ------------------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.chromium
def test_the_page_in_headless_chromium_screenshot_dom_and_pdf(seeded: Seeded,
                                                               tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (./dev setup installs it)")
    data = report_json(seeded)
    page = tmp_path / "report.html"
    page.write_text(report_html(seeded, "nl"))
    url = page.resolve().as_uri()
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
            # Nothing may come from the network: every host resolves to nowhere.
            "--host-resolver-rules=MAP * ~NOTFOUND"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*base, *args, url], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    shot = tmp_path / "shot.png"
    run("--window-size=1100,1600", f"--screenshot={shot}")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000

    dom = run("--dump-dom").stdout
    assert figures(dom) == figures(page.read_text())
    assert figures(dom)["calls"] == str(data["calls"])
    assert len(re.findall(r'<figure class="chart" data-chart="weeks"><svg', dom)) == 3
    assert len(re.findall(r'<figure class="chart" data-chart="purges"><svg', dom)) == 1
    assert "Register van verwerkingsactiviteiten" in dom

    pdf = tmp_path / "report.pdf"
    run("--no-pdf-header-footer", f"--print-to-pdf={pdf}")
    blob = pdf.read_bytes()
    assert blob[:5] == b"%PDF-" and len(blob) > 50_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", blob)) >= 2  # a real multi-page print


# --- the fast, parallel chain check equals audit.verify_chain -------------------------------

TAMPER = {
    "clean": [],
    "proof field edited": ["UPDATE calls SET outcome = 'x' WHERE seq = 5"],
    "personal field edited": ["UPDATE calls SET channel = 'PJSIP/other' WHERE seq = 7"],
    "row deleted": ["DELETE FROM calls WHERE seq = 6"],
    "last rows deleted": ["DELETE FROM calls WHERE seq > 74"],  # past a purge anchor
    "salt removed": ["UPDATE calls SET personal_salt = NULL WHERE seq = 9 "
                     "AND redacted_at IS NULL"],
    "redacted row refilled": ["UPDATE calls SET redacted_at = '2026-01-01T00:00:00.000000Z', "
                              "personal_salt = NULL WHERE seq = 11",
                              "UPDATE calls SET channel = 'PJSIP/x' WHERE seq = 11"],
    "renumbered": ["UPDATE calls SET seq = seq + 1000 WHERE seq = 12"],
    "first row edited": ["UPDATE calls SET flow = 'other' WHERE seq = 1"],
    "anchor rewritten": ["UPDATE purge_runs SET head_hash = 'ab' WHERE head_seq IS NOT NULL"],
}


@pytest.fixture(scope="module")
def odd_log(seeded: Seeded) -> Path:
    """The seeded log plus rows whose texts need JSON escapes: quotes, backslashes,
    control characters, non-ASCII and U+2028."""
    from consentivr.purgelog import open_log
    from consentivr.verifier import verify_log

    odd = seeded.root / "odd"
    odd.mkdir()
    shutil.copy(seeded.db, odd / "consent.db")
    log = ConsentLog(odd / "consent.db", CallerKey(KEY))
    now = time.time()
    texts = ['"quoted" \\ back', "tab\there\nnew\x01\x1f\x7f", "é ü 中文 \u2028 \U0001f600"]
    log.append_many([DecisionRecord(
        call_id=f"odd{i}", channel_id=t, linkedid="l", channel_name=t, caller=t,
        flow="main", language="nl", notice_version=t, started_at=now - 5, decided_at=now,
        keys=(KeyPress("1", now, t),), decisions={"recording": Decision.NO},
        retention_until={"recording": now}, recording_path=None, outcome=t,
    ) for i, t in enumerate(texts)])
    log.close()
    open_log(odd / "consent.db").close()
    assert verify_log(odd / "consent.db").ok
    return odd / "consent.db"


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_the_parallel_check_finds_what_verify_finds(odd_log: Path, tmp_path: Path,
                                                    case: str) -> None:
    from consentivr.audit import verify_chain
    from consentivr.verifier import verify_log

    db = tmp_path / "consent.db"
    shutil.copy(odd_log, db)
    conn = sqlite3.connect(db)
    with conn:
        for statement in TAMPER[case]:
            conn.execute(statement)
    conn.row_factory = sqlite3.Row
    expected = verify_chain(conn)
    conn.close()
    assert expected.ok == (case == "clean")
    assert verify_log(db, workers=1) == expected
    assert verify_log(db, workers=3, parallel_from=0) == expected


def test_the_report_shows_who_took_the_callback_list(tmp_path: Path) -> None:
    s = seed(tmp_path)
    runner = CliRunner()
    for by in ("Anna", "Bert"):
        result = runner.invoke(main, ["callbacks", "export", "--config", str(s.config),
                                      "--by", by])
        assert result.exit_code == 0, result.output
    listed = result.stdout.splitlines()[1:]
    [(held,)] = sql(s, "SELECT call_id FROM calls WHERE caller_number IS NOT NULL LIMIT 1")
    result = runner.invoke(main, ["callbacks", "done", "--config", str(s.config),
                                  "--by", "Bert", held])
    assert result.exit_code == 0, result.output
    data = report_json(s)["callbacks"]
    assert [(e["exported_by"], e["entries"]) for e in data["exports"]] == [
        ("Anna", len(listed)), ("Bert", len(listed))]
    assert data["numbers_cleared"] >= 1
    assert sql(s, "SELECT count(*) FROM calls WHERE call_id = ? AND caller_number IS NULL",
               held) == [(1,)]
    assert [d["done_by"] for d in data["done"]] == ["Bert"]
    page = report_html(s, "nl")
    assert "De terugbellijst" in page and "Anna" in page
    assert f'data-callbacks-cleared="{data["numbers_cleared"]}"' in page
    for number in s.numbers:
        assert number not in page


def test_a_notice_version_shows_its_more_information_part() -> None:
    from consentivr.flowfile import load_dialplans
    from consentivr.logstats import NoticeUse
    from consentivr.report import _notices

    flow = load_dialplans([Path(__file__).parent.parent / "dialplan" / "gemeente.yaml"],
                          Path("/p")).flows["gemeente"]

    class Stats:
        def notice_versions(self, period: Period) -> list[NoticeUse]:
            return [NoticeUse("gemeente", "en", flow.notice_version("en"), 3, "a", "b")]

    [entry] = _notices(Stats(), {"gemeente": flow}, Period(None, None))  # type: ignore[arg-type]
    assert [p["step"] for p in entry["parts"]] == ["notice", "recording", "callback",
                                                   "more_info"]
    assert entry["parts"][-1]["text"].startswith("The municipality of Voorbeeldstad is")
