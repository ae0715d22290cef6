"""Fuzzing (issue 7): config files and channel data never give a traceback or an
unsafe path.

- Config: valid configs mutated at random (values replaced by hostile text, numbers,
  lists, mappings; keys dropped or invented) and raw text. ``load_settings`` returns
  Settings or raises ConfigError with one-line problems that never quote a secret.
- Channel data: caller ids, channel names, ids, flow arguments and whole events with
  quotes, newlines, ``;``, ``..``, NULs, lone surrogates, very long and non-ASCII
  strings, fed through ``StasisApp.handle_event`` (fake ARI and recorder, the real
  consent log). Nothing raises, every recording path is ``<recordings dir>/<hex>.wav``,
  every id that reaches an ARI path is one Asterisk could have made, and the log
  stores what it got only as SQL parameters.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from consentivr.callers import WITHHELD, normalise
from consentivr.configfile import load_settings
from consentivr.consentwriter import ConsentWriter
from consentivr.driver import clean, clean_id
from consentivr.errors import ConfigError
from consentivr.stasis import StasisApp
from consentivr.store import CallerKey, ConsentLog
from consentivr_testbed.testbed import flow_yaml
from tests.fault_fixtures import (
    FakeAri,
    FakeCommitter,
    FakeRecorder,
    record,
    rows,
    settings_in,
    wait_for,
)

SECRET = "Fuzz-Secret-0123456789"
HOSTILE = [
    "", " ", "'", '"', "\\", ";", "..", "../..", "../../etc/passwd", "a\nb", "a\r\nb",
    "\0", "%00", "$(id)", "`id`", "${EXTEN}", "a,b", "a|b", "x" * 5000, "é", "日本",
    "\u202e", "\ufeff", "💥", "\ud800", "Robert'); DROP TABLE calls;--", "' OR 1=1 --",
    "Action: Command\r\nCommand: core stop now", "-1", "1e309", "NaN",
]
hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=40),  # surrogates too
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE), st.text(max_size=10)),
)
scalar = st.one_of(hostile_text, st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.booleans(), st.none())
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)),
    max_leaves=6)


# =========================================================================== config files


def base_config(work: Path) -> dict[str, Any]:
    return {
        "ari": {"url": "http://127.0.0.1:8088", "username": "consentivr",
                "password": SECRET, "app": "consentivr"},
        "ami": {"host": "127.0.0.1", "port": 5038, "username": "consentivr",
                "password": SECRET},
        "database": str(work / "consent.db"),
        "recordings": {"dir": str(work / "rec"), "options": "b"},
        "prompts_dir": str(work / "prompts"),
        "recovery": "continue",
        "flows": yaml.safe_load(flow_yaml()),
    }


def paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, sub in doc.items():
            found += paths_of(sub, (*prefix, key))
    elif isinstance(doc, list):
        for index, sub in enumerate(doc):
            found += paths_of(sub, (*prefix, index))
    return found


@st.composite
def mutated_config(draw: st.DrawFn, work: Path) -> dict[str, Any]:
    doc = copy.deepcopy(base_config(work))
    for _ in range(draw(st.integers(1, 4))):
        paths = paths_of(doc)
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(value)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(hostile_text)] = draw(value)
    return doc


def check_load(path: Path, secret: str | None = SECRET) -> None:
    """Settings or a ConfigError of one-line problems; ``secret`` (given only as a
    password or key) is never quoted back."""
    try:
        load_settings(path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must say what is wrong"
        for problem in exc.problems:
            assert "\n" not in problem and "\r" not in problem, f"not one line: {problem!r}"
            assert secret is None or secret not in problem, "a secret reached an error message"


def _dump(doc: Any) -> str | None:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_configs_load_or_fail_cleanly(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        doc = data.draw(mutated_config(work))
        text = _dump(doc)
        assume(text is not None)
        path = work / "config.yaml"
        path.write_text(str(text), encoding="utf-8", errors="surrogatepass")
        check_load(path)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from([
        "ari:", "  url: http://x", "  password: " + SECRET, "flows:", "  main:", "- a",
        "  - {", "key: [", "&a x", "*a", "!!python/object:os.system", "? a", "%YAML 1.1",
        "---", "...", "\t", "  recovery: maybe", "database: ..", '"unterminated',
    ]), max_size=12).map("\n".join),
))
def test_raw_config_text_never_gives_a_traceback(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        # Here the "secret" may stand anywhere (a flow name...): only tracebacks count.
        check_load(path, secret=None)


def test_config_fuzz_can_fail() -> None:
    """The checker itself catches a secret in a message (so the fuzz tests can fail)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        doc = base_config(work)
        doc["recovery"] = SECRET  # the secret in a field whose bad value is quoted back
        path = work / "config.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        with pytest.raises(AssertionError):
            check_load(path)


# =========================================================================== channel data


RECORDING = re.compile(r"[0-9a-f]{32}\.wav")


def _settings(work: Path) -> Any:
    # Short timeouts: a fuzzed call that presses nothing ends quickly.
    return settings_in(work, flows=flow_yaml(timeout=0.05, retries=0))


@st.composite
def stasis_event(draw: st.DrawFn) -> dict[str, Any]:
    """A StasisStart whose channel data is hostile, but whose id is usable."""
    channel_id = draw(st.one_of(st.just("ch-1"), st.from_regex(r"[A-Za-z0-9.\-_]{1,40}",
                                                               fullmatch=True)))
    assume(channel_id.strip("."))
    return {
        "type": "StasisStart", "application": "consentivr",
        "args": draw(st.one_of(st.just(["main"]), st.just([]), st.lists(hostile_text,
                                                                        max_size=2))),
        "channel": {
            "id": channel_id,
            "name": draw(hostile_text),
            "linkedid": draw(st.one_of(hostile_text, st.just(channel_id))),
            "caller": {"name": draw(hostile_text), "number": draw(hostile_text)},
        },
    }


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def _run_call(work: Path, event: dict[str, Any], digits: str) -> tuple[FakeAri, FakeRecorder,
                                                                        list[Any]]:
    settings_obj = _settings(work)
    log = ConsentLog(work / "consent.db", CallerKey(b"k" * 32))
    committer = FakeCommitter(log=log)
    recorder = FakeRecorder()
    errors = _Errors()
    logging.getLogger("consentivr").addHandler(errors)
    loop_errors: list[Any] = []

    async def main() -> FakeAri:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        ari = FakeAri()
        app = StasisApp(settings_obj, ari, recorder, ConsentWriter(committer))
        ari.app = app
        app.handle_event(event)
        channel_id = clean_id(event["channel"]["id"])
        for digit in digits:
            await asyncio.sleep(0.02)
            app.handle_event({"type": "ChannelDtmfReceived", "digit": digit,
                              "channel": {"id": event["channel"]["id"]}})
        await wait_for(lambda: not app.tasks, 10, "the call to end")
        assert channel_id not in app.sessions
        await app.writer.close(1)
        return ari

    try:
        ari = asyncio.run(main())
    finally:
        logging.getLogger("consentivr").removeHandler(errors)
        log.close()
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert not loop_errors, loop_errors
    return ari, recorder, rows(work / "consent.db")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=stasis_event(), digits=st.text(alphabet="0123456789*#", max_size=4))
def test_hostile_channel_data_through_the_app_and_the_log(event: dict[str, Any],
                                                          digits: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ari, recorder, logged = _run_call(work, event, digits)
        recordings = work / "recordings"
        for _channel, path, _options in recorder.started:
            assert Path(path).parent == recordings and RECORDING.fullmatch(Path(path).name)
        for row in logged:
            if row["recording_path"] is not None:
                assert Path(row["recording_path"]).parent == recordings
                assert RECORDING.fullmatch(Path(row["recording_path"]).name)
            assert row["uniqueid"] == event["channel"]["id"]
            number = clean(event["channel"]["caller"]["number"])
            caller = normalise(number, None)
            if row["caller_number"] is not None:  # only kept for a callback yes, as E.164
                assert row["caller_number"] == caller.e164
            # Never in clear: a pseudonym, or a marker for withheld and garbage.
            assert row["caller_hash"] is not None and (
                row["caller_hash"] == WITHHELD) == (caller.kind == "withheld")
        for ident in ari.paths:
            assert clean_id(ident) == ident or ident.startswith(f"{event['channel']['id']}-p")
        # Nothing was created outside the work dir from channel data.
        assert {p.name for p in work.iterdir()} <= {"config.yaml", "consent.db",
                                                     "consent.db-wal", "consent.db-shm",
                                                     "recordings", "rec", "prompts"}


@settings(max_examples=200, deadline=None)
@given(event=st.one_of(
    st.dictionaries(st.sampled_from(["type", "channel", "playback", "digit", "args",
                                     "application"]), value, max_size=5),
    st.builds(lambda kind, channel: {"type": kind, "channel": channel},
              st.sampled_from(["StasisStart", "ChannelDtmfReceived", "StasisEnd",
                               "PlaybackFinished", "ChannelDestroyed"]), value),
    st.builds(lambda target: {"type": "PlaybackFinished",
                              "playback": {"id": "x", "target_uri": target}}, value),
    value,
))
def test_malformed_events_never_raise(event: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings_obj = _settings(Path(tmp))

        async def main() -> None:
            ari = FakeAri(play_seconds=30)
            app = StasisApp(settings_obj, ari, FakeRecorder(), ConsentWriter(FakeCommitter()))
            ari.app = app
            app.handle_event(event)
            app.handle_event(event)  # twice: duplicates must not double a session
            assert len(app.sessions) <= 1
            for ident in ari.paths:
                assert clean_id(ident) is not None or "-p" in ident
            for task in list(app.tasks):
                task.cancel()
            await asyncio.sleep(0)
            await app.writer.close(0.1)

        asyncio.run(main())


@settings(max_examples=100, deadline=None)
@given(caller=hostile_text, name=hostile_text, linkedid=hostile_text)
def test_the_consent_log_takes_cleaned_channel_data_as_parameters(
    caller: str, name: str, linkedid: str,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.db"
        log = ConsentLog(path, CallerKey(b"k" * 32))
        try:
            rec = record(caller=clean(caller) or None)
            rec = dataclasses.replace(rec, channel_name=clean(name), linkedid=clean(linkedid),
                                      callback_until=rec.decided_at + 1)
            log.append(rec)
        finally:
            log.close()
        conn = sqlite3.connect(path)
        try:
            (count,) = conn.execute("SELECT count(*) FROM calls").fetchone()
            stored = conn.execute("SELECT caller_number, channel, linkedid FROM calls").fetchone()
        finally:
            conn.close()
        assert count == 1, "the table is still there, with exactly our row"
        # The number is kept only as E.164; withheld or garbage never in clear.
        expected = normalise(clean(caller) or None, None).e164
        assert stored == (expected, clean(name), clean(linkedid))


@pytest.mark.parametrize("raw", HOSTILE)
def test_clean_keeps_text_safe_for_sqlite_and_hmac(raw: str) -> None:
    text = clean(raw)
    text.encode("utf-8")  # no lone surrogates
    assert "\0" not in text and len(text) <= 256
    CallerKey(b"k").pseudonym(text)


def test_the_harness_reaches_a_recorded_yes() -> None:
    """Sanity of the harness (so the fuzz test can fail): a plain call can record."""
    with tempfile.TemporaryDirectory() as tmp:
        event = {"type": "StasisStart", "args": ["main"],
                 "channel": {"id": "ch-1", "name": "PJSIP/a-1", "caller": {"number": "+31"}}}
        for _ in range(20):  # digits race the fake prompts: try until one lands as a yes
            work = Path(tempfile.mkdtemp(dir=tmp))
            _, recorder, logged = _run_call(work, event, "1111")
            if logged[0]["decisions"]["recording"] == "yes":
                break
        assert logged[0]["decisions"]["recording"] == "yes"
        [(channel, path, _)] = recorder.started
        assert channel == "PJSIP/a-1" and RECORDING.fullmatch(Path(path).name)
